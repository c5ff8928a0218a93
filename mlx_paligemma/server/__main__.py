"""`python -m mlx_paligemma.server`: load a model, bind loopback, serve the API and the page.

The socket is bound before the model loads, so a port in use is a one-line error at once,
not after a minute of loading; `--port 0` picks a free port (printed on stderr).

`--shard` under `mlx.launch -n N`: the model is split over the N ranks; rank 0 binds, loads its part
and serves, the other ranks load theirs and follow rank 0's engine (`follower.py`). In a single
process `--shard` changes nothing, as for `generate --shard`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlx_paligemma.cli import ArgumentParser, fail, main_entry, run_main

PROG = "mlx-paligemma server"
API_KEY_ENV = "PALIGEMMA_API_KEY"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Serve a PaliGemma model over HTTP (OpenAI-compatible) with a web page.")
    p.add_argument("--model", help="checkpoint directory or hub repo id (default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--mask-decoder", metavar="PATH", help="segmentation mask decoder (vae-oid.npz or converted)")
    p.add_argument("--adapter-path", metavar="P", help="LoRA adapters to apply to the model")
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="most requests decoded together; the others join as rows finish (default 8)",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="an idle server starts once no request has come for this long, so that requests sent together "
        "are prefilled together (10; 0: no wait); while it decodes, requests join at the next step",
    )
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set)")
    p.add_argument("--allow-local-files", action="store_true", help="accept file:// image URLs (off: data: URLs only)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: checkpoint's)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask (1024)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest image file, in MB (20)")
    p.add_argument("--max-image-pixels", type=int, default=36_000_000, help="largest image, in pixels (36M)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, in MB (32)")
    p.add_argument(
        "--vision-cache-mb",
        type=float,
        default=None,
        help="memory for the image features of recent images, reused when an image comes again "
        "(default: room for about 64 images of the loaded model; 0: off)",
    )
    p.add_argument("--max-queued", type=int, default=256, help="requests waiting beyond this get 503 (256)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--shard",
        action="store_true",
        help="under mlx.launch: split the language model over the ranks (tensor parallel); rank 0 serves HTTP, "
        "the other ranks follow its batches",
    )
    p.add_argument("--shard-vision", action="store_true", help="with --shard: split the vision tower too")
    return p


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, IPv4 or IPv6 as the host says."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _load(args):
    """(model id, model, processor): --model, or the embedded demo model when it is not given."""
    import mlx_paligemma as mp
    from mlx_paligemma.errors import CheckpointError

    kwargs = {"dtype": args.dtype, "adapter_path": args.adapter_path}
    if args.shard:
        kwargs.update(shard=True, shard_vision=args.shard_vision)
    if args.model is None:
        try:
            return "demo", *mp.load("demo", **kwargs)
        except CheckpointError as e:
            raise CheckpointError(
                f"no --model given and the embedded demo model is not available ({e}): pass --model DIR_OR_REPO_ID"
            ) from None
    name = Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model
    return name, *mp.load(args.model, **kwargs)


def _load_mask_decoder(path: Optional[str]):
    if path is None:
        return None
    from mlx_paligemma.mask_decoder import load_mask_decoder

    return load_mask_decoder(path)


def _follow(args) -> int:
    """A rank other than 0 of `--shard`: its part of the model, stepped as rank 0 says; no socket, no output."""
    import mlx.core as mx

    from mlx_paligemma.engine import Engine
    from mlx_paligemma.server.follower import follow

    _, model, processor = _load(args)
    cache = None if args.vision_cache_mb is None else int(args.vision_cache_mb * 2**20)  # as rank 0's
    follow(Engine(model, max_batch=args.max_batch, vision_cache_bytes=cache), processor, mx.distributed.init())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shard_vision and not args.shard:
        return fail(PROG, "--shard-vision needs --shard")
    if not 0 <= args.port <= 65535:
        return fail(PROG, f"--port: must be 0..65535, got {args.port}")
    if args.batch_window_ms < 0:
        return fail(PROG, f"--batch-window-ms: must be >= 0, got {args.batch_window_ms}")
    if args.max_batch < 1:
        return fail(PROG, f"--max-batch: must be at least 1, got {args.max_batch}")
    if args.vision_cache_mb is not None and args.vision_cache_mb < 0:
        return fail(PROG, f"--vision-cache-mb: must be >= 0, got {args.vision_cache_mb:g}")
    if args.max_queued < 1:
        return fail(PROG, f"--max-queued: must be at least 1, got {args.max_queued}")
    if args.max_tokens_limit < 1 or args.max_image_pixels < 1 or args.max_image_mb <= 0 or args.max_body_mb <= 0:
        return fail(PROG, "--max-tokens-limit, --max-image-pixels, --max-image-mb and --max-body-mb must be positive")
    try:
        import uvicorn

        from mlx_paligemma.server.app import Limits, create_app
    except ImportError as e:
        return fail(
            PROG, f"the server needs FastAPI and uvicorn ({e.name} is missing): pip install 'mlx-paligemma[server]'"
        )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.shard:
        import mlx.core as mx

        if mx.distributed.init().rank() != 0:
            return run_main(PROG, lambda: _follow(args))

    def body() -> int:
        try:
            sock = bind(args.host, args.port)
        except OSError as e:
            return fail(PROG, f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        if not _is_loopback(args.host) and not api_key:
            print(
                f"{PROG}: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
                file=sys.stderr,
            )
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with sock:
            model_id, model, processor = _load(args)
            mask_decoder = _load_mask_decoder(args.mask_decoder)
            limits = Limits(
                max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                max_image_bytes=int(args.max_image_mb * 1024 * 1024),
                max_image_pixels=args.max_image_pixels,
                max_tokens=args.max_tokens_limit,
                default_max_tokens=min(100, args.max_tokens_limit),
                max_queued=args.max_queued,
            )
            app = create_app(
                model,
                processor,
                model_id=model_id,
                max_batch=args.max_batch,
                batch_window=args.batch_window_ms / 1000,
                vision_cache_mb=args.vision_cache_mb,
                api_key=api_key,
                allow_local_files=args.allow_local_files,
                mask_decoder=mask_decoder,
                limits=limits,
            )
            app.state.batcher.warm_up()
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(
                f"{PROG}: serving {model_id} on http://{shown}:{port}/ (max batch {args.max_batch})",
                file=sys.stderr,
                flush=True,
            )
            config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
            uvicorn.Server(config).run(sockets=[sock])
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    main_entry(main)
