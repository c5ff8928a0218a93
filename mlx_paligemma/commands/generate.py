"""`mlx-paligemma generate` (or `python -m mlx_paligemma.generate`): ask PaliGemma about images.

    mlx-paligemma generate --model google/paligemma-3b-mix-224 --image cat.jpg --prompt "caption en"

The command-line front end of `generation` (the library's generation loop). The answer streams
to stdout; `--verbose` adds statistics on stderr. Several --image/--prompt pairs run as one
batch. User errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..cli import ArgumentParser, main_entry, run_main
from ..dtypes import NAMES
from ..errors import ImageTooLargeError, PaliGemmaError
from ..fsutil import atomic_path
from ..processor import DEFAULT_MAX_IMAGE_PIXELS

PROG = "mlx-paligemma generate"
# Above this many prompt tokens the CLI says on stderr that the prefill will take a while: the
# prefix attends bidirectionally, so it runs as one pass that cannot report progress part-way.
LONG_PREFILL_TOKENS = 2048


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Caption, answer questions about, detect or segment objects in images with PaliGemma.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face repo id (default: the small shapes demo model shipped inside)",
    )
    p.add_argument("--adapter-path", default=None, help="LoRA adapter directory from mlx-paligemma finetune (mlx)")
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
        "--no-constrain",
        action="store_true",
        help="let detect/segment answers be free text (default: restricted to the answer format and the asked labels)",
    )
    p.add_argument(
        "--dtype",
        choices=NAMES,
        default=None,
        help="compute dtype (default: float32 for MLX on a CPU, else the checkpoint's)",
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
        help="write the image with detected boxes and labels, or masks with --mask-decoder (one image only)",
    )
    p.add_argument(
        "--mask-decoder",
        metavar="PATH",
        default=None,
        help="segmentation mask decoder (vae-oid.npz, its .safetensors, a folder or hub id): masks for segment prompts",
    )
    p.add_argument("--force", action="store_true", help="allow --draw to overwrite an existing file")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse image files larger than this many pixels (default {DEFAULT_MAX_IMAGE_PIXELS:,})",
    )
    p.add_argument("--verbose", action="store_true", help="print timing and memory statistics to stderr")
    p.add_argument(
        "--shard",
        action="store_true",
        help="under mlx.launch: split the language model over the ranks (tensor parallel); rank 0 prints",
    )
    p.add_argument("--shard-vision", action="store_true", help="with --shard: split the vision tower too")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory estimate (weights, KV cache, activations; per rank with --shard) and stop",
    )
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from ..generation import option_errors

    for name, message in option_errors(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    ):
        p.error(f"--{name.replace('_', '-')}: {message}")
    if args.max_image_pixels < 1:
        p.error(f"--max-image-pixels: must be at least 1, got {args.max_image_pixels}")
    if len(args.image) != len(args.prompt):
        p.error(f"got {len(args.image)} --image and {len(args.prompt)} --prompt: give one prompt per image")
    if args.device is not None and args.backend != "torch":
        p.error("--device applies to --backend torch only")
    if args.shard_vision and not args.shard:
        p.error("--shard-vision needs --shard")
    if args.shard and args.backend != "mlx":
        p.error("--shard applies to --backend mlx only")
    if args.draw is not None:
        if len(args.image) != 1:
            p.error("--draw takes exactly one --image")
        if Path(args.draw).exists() and not args.force:
            p.error(f"--draw: {args.draw} exists; pass --force to overwrite it")
        if not Path(args.draw).resolve().parent.is_dir():
            p.error(f"--draw: directory of {args.draw} does not exist")
    for image in args.image:
        if Path(image).is_dir():
            p.error(f"--image: {image}: is a directory, not an image file")
        if not Path(image).is_file():
            p.error(f"--image: {image}: no such file")


def _stats_line(stats) -> str:
    return (
        f"prompt: {stats.prompt_tokens} tokens x {stats.batch_size}, {stats.prefill_tps:.1f} tokens/s | "
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s | "
        f"vision {stats.vision_time:.2f}s | peak memory {stats.peak_memory_gb:.2f} GB"
    )


def is_segment_prompt(prompt: str) -> bool:
    return prompt.strip().startswith("segment ")


def note_missing_mask_decoder(prompts: Sequence[str], mask_decoder) -> None:
    """One line on stderr when segment prompts will give codes, not masks, for want of a decoder."""
    if mask_decoder is None and any(is_segment_prompt(p) for p in prompts):
        print(
            "note: segment answers hold mask codes; pass --mask-decoder vae-oid.npz to turn them into masks "
            "(README: Segmentation masks)",
            file=sys.stderr,
        )


def segmentations(prompts: Sequence[str], results, mask_decoder) -> list:
    """Per result, the masks of a `segment` prompt (None for other prompts, or without a decoder)."""
    from ..segmentation import parse_segmentations

    is_segment = [is_segment_prompt(p) for p in prompts]
    if mask_decoder is None:
        return [None] * len(results)
    return [
        parse_segmentations(r.text, r.image_size, mask_decoder) if seg else None for r, seg in zip(results, is_segment)
    ]


def json_row(prompt: str, result, found_segmentations: Optional[list] = None) -> dict:
    """One answer as `--json` prints it (and `mlx-paligemma batch` writes it): text, tokens, boxes in
    the original image's pixels, and for a `segment` prompt decoded with a mask decoder its masks."""
    from ..tasks import parse_detections

    row = {
        "prompt": prompt,
        "text": result.text,
        "tokens": result.token_ids,
        "finish_reason": result.finish_reason,
        "boxes": [d.to_dict() for d in parse_detections(result.text, result.image_size)],
    }
    if found_segmentations is not None:
        row["segmentations"] = [seg.to_dict() for seg in found_segmentations]
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if not args.shard:
        return run_main(parser.prog, lambda: _run(args))
    import mlx.core as mx

    if mx.distributed.init().rank() == 0:
        return run_main(parser.prog, lambda: _run(args))
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # every rank computes, rank 0 speaks
        return run_main(parser.prog, lambda: _run(args, writes_files=False))


def _printed(chunks: Iterator) -> Iterator:
    """Pass a stream's chunks on, printing each one's text as it arrives."""
    for chunk in chunks:
        print(chunk.text, end="", flush=True)
        yield chunk
    print()


def _dry_run(args: argparse.Namespace) -> int:
    """The memory estimate of this generation (mlx backend), from config.json alone; nothing is loaded."""
    from ..checkpoint import resolve_model_dir
    from ..config import load_config
    from ..memory import available_memory, estimate_generate
    from ..processor import Processor

    if args.backend == "torch":
        raise PaliGemmaError("--dry-run: estimates the mlx backend only")
    ranks = 1
    if args.shard:  # under mlx.launch: what each rank will hold; rank 0 prints
        import mlx.core as mx

        group = mx.distributed.init()
        if group.rank() != 0:
            return 0
        ranks = group.size()
    model_dir = resolve_model_dir(args.model)
    processor = Processor.from_dir(model_dir, load_config(model_dir))
    text = int(processor.encode_prompts(list(args.prompt))["attention_mask"].sum(axis=1).max())
    est = estimate_generate(
        model_dir,
        dtype=args.dtype,
        batch=len(args.image),
        text_tokens=max(text - load_config(model_dir).num_image_tokens, 1),
        max_tokens=args.max_tokens,
        tp_ranks=ranks,
    )
    what = f"generate, {len(args.image)} image(s), {args.max_tokens} new tokens"
    print(est.report(available_memory(), what + (f", per rank of {ranks}" if ranks > 1 else "")))
    return 0


def _run(args: argparse.Namespace, writes_files: bool = True) -> int:
    from .. import generation
    from ..grammar import grammar_processors
    from ..tasks import draw_detections, parse_detections

    mask_decoder = None
    if args.mask_decoder is not None:  # before the model: a bad path fails fast
        from ..mask_decoder import load_mask_decoder

        mask_decoder = load_mask_decoder(args.mask_decoder, backend=args.backend, device=args.device)
    if args.model is None:
        args.model = "demo"
        print(
            "using the built-in demo model (trained on synthetic shapes only); "
            "pass --model google/paligemma-3b-mix-224 or a checkpoint directory for a real one",
            file=sys.stderr,
        )
    if args.dry_run:
        return _dry_run(args)
    if args.adapter_path is not None and args.backend == "torch":
        raise PaliGemmaError("--adapter-path: the torch backend reads merged checkpoints (finetune --merge)")
    if args.backend == "torch":
        from ..reference import load as load_torch

        model, processor = load_torch(args.model, device=args.device, dtype=args.dtype)
    else:
        from ..load import load

        model, processor = load(
            args.model,
            dtype=args.dtype,
            adapter_path=args.adapter_path,
            shard=args.shard,
            shard_vision=args.shard_vision,
        )
    processor.max_image_pixels = args.max_image_pixels
    try:
        images = [processor.load_image(path) for path in args.image]
    except ImageTooLargeError as e:  # the library's message names the parameter; say the flag
        raise ImageTooLargeError(e.path, e.width, e.height, e.limit, "--max-image-pixels") from None
    prompt_tokens = int(processor.encode_prompts(list(args.prompt))["attention_mask"].sum(axis=1).max())
    generation.check_prompt_length(model, prompt_tokens)
    if prompt_tokens > LONG_PREFILL_TOKENS:
        print(f"{PROG}: reading a long prompt ({prompt_tokens} tokens) before the first new token...", file=sys.stderr)
    options = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    grammars = [[] for _ in args.prompt] if args.no_constrain else grammar_processors(processor, args.prompt)
    single = len(images) == 1
    stream = single and not (args.no_stream or args.json)
    if stream:
        chunks = generation.stream_generate(
            model, processor, images[0], args.prompt[0], logits_processors=grammars[0], **options
        )
        results = generation.collect_results(processor, _printed(chunks), [images[0].size])
    else:
        results = generation.generate(
            model, processor, images, list(args.prompt), logits_processors=grammars, **options
        )
    stats = results[0].stats
    boxes = [parse_detections(r.text, r.image_size) for r in results]
    note_missing_mask_decoder(args.prompt, mask_decoder)
    segs = segmentations(args.prompt, results, mask_decoder)

    if args.json:
        rows = [json_row(p, r, found) for p, r, found in zip(args.prompt, results, segs)]
        out = {**rows[0], "stats": asdict(stats)} if single else {"results": rows, "stats": asdict(stats)}
        print(json.dumps(out, ensure_ascii=False))
    elif not stream:
        for i, r in enumerate(results):
            print(r.text if single else f"[{i}] {r.text}")
    if args.draw is not None and writes_files:
        if segs[0] is not None:
            from ..segmentation import draw_segmentations

            drawn = draw_segmentations(images[0], segs[0])
        else:
            drawn = draw_detections(images[0], boxes[0])
        with atomic_path(args.draw) as tmp:
            drawn.save(tmp, format="PNG")
    if args.verbose and writes_files:
        print(_stats_line(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    main_entry(main)
