"""`python -m mlx_paligemma.generate`: ask PaliGemma about images from the command line.

    python -m mlx_paligemma.generate --model google/paligemma-3b-mix-224 --image cat.jpg --prompt "caption en"

The answer streams to stdout; `--verbose` adds statistics on stderr. Several --image/--prompt
pairs run as one batch. User errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .errors import PaliGemmaError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mlx_paligemma.generate",
        description="Caption, answer questions about, detect or segment objects in images with PaliGemma.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face repo id (default: the small shapes demo model shipped inside)",
    )
    p.add_argument("--adapter-path", default=None, help="LoRA adapter directory from mlx_paligemma.finetune (mlx)")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for a batch)")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help='task prompt, e.g. "caption en", "answer en what is this?", "detect cat" (repeat for a batch)',
    )
    p.add_argument("--max-tokens", type=int, default=100, help="most tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.1 (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="compute dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--backend", choices=["mlx", "torch"], default="mlx", help="mlx (default) or the PyTorch reference backend"
    )
    p.add_argument("--device", default=None, help="torch backend device: mps, cuda, cpu (default: best available)")
    p.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, boxes, stats")
    p.add_argument(
        "--draw",
        metavar="OUT.png",
        default=None,
        help="write the image with detected boxes and labels (one image only)",
    )
    p.add_argument("--force", action="store_true", help="allow --draw to overwrite an existing file")
    p.add_argument("--verbose", action="store_true", help="print timing and memory statistics to stderr")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(args.image) != len(args.prompt):
        p.error(f"got {len(args.image)} --image and {len(args.prompt)} --prompt: give one prompt per image")
    if args.device is not None and args.backend != "torch":
        p.error("--device applies to --backend torch only")
    if args.draw is not None:
        if len(args.image) != 1:
            p.error("--draw takes exactly one --image")
        if Path(args.draw).exists() and not args.force:
            p.error(f"--draw: {args.draw} exists; pass --force to overwrite it")
        if not Path(args.draw).resolve().parent.is_dir():
            p.error(f"--draw: directory of {args.draw} does not exist")
    for image in args.image:
        if not Path(image).is_file():
            p.error(f"--image: {image}: no such file")


def _save_atomically(image, out: str) -> None:
    """Write next to the target, then rename: an interrupted run never leaves a partial file."""
    out_path = Path(out).resolve()
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stats_line(stats) -> str:
    return (
        f"prompt: {stats.prompt_tokens} tokens x {stats.batch_size}, {stats.prefill_tps:.1f} tokens/s | "
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s | "
        f"vision {stats.vision_time:.2f}s | peak memory {stats.peak_memory_gb:.2f} GB"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        return _run(args)
    except PaliGemmaError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from . import generation
    from .processor import load_image
    from .tasks import draw_detections, parse_detections

    if args.model is None:
        args.model = "demo"
        print(
            "using the built-in demo model (trained on synthetic shapes only); "
            "pass --model google/paligemma-3b-mix-224 or a checkpoint directory for a real one",
            file=sys.stderr,
        )
    if args.adapter_path is not None and args.backend == "torch":
        raise PaliGemmaError("--adapter-path: the torch backend reads merged checkpoints (finetune --merge)")
    if args.backend == "torch":
        from .reference import load as load_torch

        model, processor = load_torch(args.model, device=args.device, dtype=args.dtype)
    else:
        from .load import load

        model, processor = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path)
    images = [load_image(path) for path in args.image]
    options = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    single = len(images) == 1
    stream = single and not (args.no_stream or args.json)
    if stream:
        ids, stats, reason = [], None, "length"
        for chunk in generation.stream_generate(model, processor, images[0], args.prompt[0], **options):
            print(chunk.text, end="", flush=True)
            stats = chunk.stats
            if chunk.finish_reason == "stop":
                reason = "stop"
            else:
                ids.append(chunk.token_id)
        print()
        results = [generation.GenerationResult(processor.decode(ids), ids, reason, images[0].size, stats)]
    else:
        results = generation.generate(model, processor, images, list(args.prompt), **options)
    stats = results[0].stats
    boxes = [parse_detections(r.text, r.image_size) for r in results]

    if args.json:
        rows = [
            {
                "prompt": p,
                "text": r.text,
                "tokens": r.token_ids,
                "finish_reason": r.finish_reason,
                "boxes": [d.to_dict() for d in b],
            }
            for p, r, b in zip(args.prompt, results, boxes)
        ]
        out = {**rows[0], "stats": asdict(stats)} if single else {"results": rows, "stats": asdict(stats)}
        print(json.dumps(out, ensure_ascii=False))
    elif not stream:
        for i, r in enumerate(results):
            print(r.text if single else f"[{i}] {r.text}")
    if args.draw is not None:
        _save_atomically(draw_detections(images[0], boxes[0]), args.draw)
    if args.verbose:
        print(_stats_line(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
