"""`mlx-paligemma batch`: run PaliGemma over a folder or a dataset of images, one JSON line per image.

    mlx-paligemma batch --model google/paligemma2-3b-mix-224 --images photos/ --prompt "caption en" \\
        --out captions.jsonl

Images go through the library's batched generation `--max-batch` at a time; rows are written in
input order, a chunk at a time (appended whole, then fsync'd), so `--resume` after an interruption
recomputes at most one chunk. Under `mlx.launch -n N`, rank r computes every N-th image of each
chunk and rank 0 writes the merged rows; with `--shard` the ranks instead split the model and all
compute every image. An unreadable image becomes a row with an `error` field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..cli import ArgumentParser, main_entry, run_main
from ..dtypes import NAMES
from ..errors import PaliGemmaError
from ..processor import DEFAULT_MAX_IMAGE_PIXELS

PROG = "mlx-paligemma batch"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Run PaliGemma over many images; write one JSON line per image.")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", type=Path, help="folder of images (searched recursively)")
    source.add_argument(
        "--data",
        metavar="FILE",
        type=Path,
        help="JSON lines {image, prompt} (paths relative to the file), a Hugging Face datasets directory or a "
        ".parquet file with an image column",
    )
    p.add_argument("--prompt", default=None, help="prompt for every image (default for --data lines without one)")
    p.add_argument("--out", required=True, type=Path, help="results, JSON lines (refused if it exists, see --resume)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out: skip the rows it holds")
    p.add_argument("--max-batch", type=int, default=8, help="images generated together (default 8)")
    p.add_argument("--max-tokens", type=int, default=100, help="most tokens per answer (default 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--mask-decoder", metavar="PATH", default=None, help="decode masks of segment prompts")
    p.add_argument("--image-column", default="image", help="dataset column holding the images (default image)")
    p.add_argument("--prompt-column", default="prompt", help="dataset column holding prompts (default prompt)")
    p.add_argument("--dtype", choices=NAMES, default=None, help="compute dtype (default as generate)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"images larger than this many pixels become error rows (default {DEFAULT_MAX_IMAGE_PIXELS:,})",
    )
    p.add_argument("--shard", action="store_true", help="under mlx.launch: split the model over the ranks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace, owns_out: bool) -> None:
    if args.max_batch < 1:
        p.error(f"--max-batch: must be at least 1, got {args.max_batch}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens: must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature: must be >= 0, got {args.temperature}")
    if args.images is not None:
        if not args.images.is_dir():
            p.error(f"--images: {args.images}: not a directory")
        if args.prompt is None:
            p.error("--images needs --prompt")
    elif not args.data.exists():
        p.error(f"--data: {args.data}: no such file or directory")
    if not owns_out:  # only rank 0 writes --out; another Mac need not have its folder
        return
    if args.out.is_dir():
        p.error(f"--out: {args.out} is a directory")
    if not args.out.resolve().parent.is_dir():
        p.error(f"--out: directory of {args.out} does not exist")
    if args.out.exists() and args.out.stat().st_size and not args.resume:
        p.error(f"--out: {args.out} exists; pass --resume to continue it, or choose another file")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import mlx.core as mx

    _check_args(parser, args, owns_out=mx.distributed.init().rank() == 0)
    return run_main(parser.prog, lambda: _run(args))


def _items(args: argparse.Namespace) -> list:
    from .. import batch_job

    if args.images is not None:
        return batch_job.folder_items(args.images, args.prompt)
    if args.data.is_file() and args.data.suffix in (".jsonl", ".json"):
        return batch_job.jsonl_items(args.data, args.prompt)
    if args.data.is_dir() or args.data.suffix == ".parquet":
        return batch_job.dataset_items(args.data, args.prompt, args.image_column, args.prompt_column)
    raise PaliGemmaError(f"--data {args.data}: expected a .jsonl file, a .parquet file or a datasets directory")


def _run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from ..batch_job import ResultsFile, broadcast_int, gather_rows
    from ..load import load

    group = mx.distributed.init()
    rank, ranks = group.rank(), group.size()
    items = _items(args)
    results = ResultsFile(args.out)
    # Rank 0 owns --out (the other ranks may be other Macs): it says where to start, or -1 to stop.
    start, problem = 0, None
    if rank == 0:
        try:
            done = results.done_rows()
            results.check_prefix(done, items)
            start = len(done)
        except PaliGemmaError as e:
            start, problem = -1, e
    start = broadcast_int(start, group)
    if start < 0:
        raise problem or PaliGemmaError(f"rank 0 refused --out {args.out} (see its message)")
    if start == len(items):
        if rank == 0:
            print(f"{PROG}: all {len(items)} rows are in {args.out}; nothing to do", file=sys.stderr)
        return 0

    mask_decoder = None
    if args.mask_decoder is not None:
        from ..mask_decoder import load_mask_decoder

        mask_decoder = load_mask_decoder(args.mask_decoder)
    if rank == 0:
        from .generate import note_missing_mask_decoder

        note_missing_mask_decoder([item.prompt for item in items[start:]], mask_decoder)
    model, processor = load(args.model, dtype=args.dtype, shard=args.shard)
    processor.max_image_pixels = args.max_image_pixels
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    split = 1 if args.shard else ranks  # a sharded model needs every rank on every image
    chunk_size = args.max_batch * split

    bar = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=start, desc="batch", unit="img", file=sys.stderr, dynamic_ncols=True)
    for at in range(start, len(items), chunk_size):
        chunk = items[at : at + chunk_size]
        mine = chunk if split == 1 else chunk[rank::split]
        lines = [
            json.dumps(row, ensure_ascii=False).encode("utf-8")
            for row in _rows(mine, model, processor, options, mask_decoder)
        ]
        per_rank = [lines] if split == 1 else gather_rows(lines, group)
        if rank == 0:
            results.append([per_rank[i % split][i // split] for i in range(len(chunk))])  # input order
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return 0


def _rows(items: list, model, processor, options: dict, mask_decoder) -> list[dict]:
    """Result rows of `items`, in their order: unreadable images give an `error` row, the rest one batch."""
    from .. import generation
    from .generate import json_row, segmentations

    rows: list[dict] = [{"image": item.image, "prompt": item.prompt} for item in items]
    images, readable = [], []
    for i, item in enumerate(items):
        try:
            images.append(processor.load_image(item.load()))
            readable.append(i)
        except (PaliGemmaError, OSError, ValueError) as e:  # missing, corrupt, too large, not an image
            rows[i]["error"] = str(e)
    if readable:
        prompts = [items[i].prompt for i in readable]
        results = generation.generate(model, processor, images, prompts, **options)
        for i, result, found in zip(readable, results, segmentations(prompts, results, mask_decoder)):
            rows[i].update(json_row(items[i].prompt, result, found))
    return rows


if __name__ == "__main__":
    main_entry(main)
