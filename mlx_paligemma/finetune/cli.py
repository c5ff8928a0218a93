"""`mlx-paligemma finetune` / `python -m mlx_paligemma.finetune`: the command line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Optional

import mlx.core as mx

from ..cli import ArgumentParser, run_main
from ..dtypes import NAMES
from .options import DESCRIPTION, PROG, FinetuneOptions
from .trainer import (
    finetune,
    plan,
)


def build_parser() -> ArgumentParser:
    d = FinetuneOptions()
    p = ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--model", required=True, help="checkpoint directory, hub repo id, or 'demo'")
    p.add_argument("--data", required=True, help="training JSON lines: {image, prefix, suffix} (paths relative)")
    p.add_argument("--val", help="validation JSON lines; its loss is reported every epoch")
    p.add_argument("--out", required=True, help="output directory (adapters, or a full checkpoint with --full)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank (default 8)")
    mode.add_argument("--full", action="store_true", help="train all weights (vision tower too with --train-vision)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scale numerator (default 16)")
    p.add_argument("--lora-layers", choices=("attn", "all"), default=d.lora_layers, help="attention or all linears")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower (frozen by default)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="train for this wall-clock time: warm-up, then cosine decay over the remaining time",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split across processes)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default 2e-5)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient norm clip (0: off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="save (and make resumable) every N steps")
    p.add_argument("--val-every", type=int, default=d.val_every, help="validation loss every N steps too")
    p.add_argument("--resume", action="store_true", help="continue from the last save in --out")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument(
        "--grad-checkpoint",
        nargs="?",
        type=int,
        const=True,
        default=False,
        metavar="N",
        help="recompute layers in the backward pass: less memory, more time. Alone: every layer; N: the first N "
        "decoder layers only. Switched on by itself, for the fewest layers that fit, when the estimate needs it",
    )
    p.add_argument(
        "--dtype",
        choices=NAMES,
        default=None,
        help="dtype of the frozen base (default: the checkpoint's; on the CPU it computes in float32 either way). "
        "--full: of the trained weights (default float32)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the memory estimate and stop (reads no weights)")
    p.add_argument(
        "--image-cache",
        type=int,
        default=d.image_cache,
        help="decoded images kept in memory (default 1024; others are decoded again when used)",
    )
    p.add_argument(
        "--loc-smoothing",
        type=float,
        default=d.loc_smoothing,
        metavar="SIGMA",
        help="Gaussian label smoothing over neighbouring <loc> bins (sigma in bins; helps detection from scratch)",
    )
    p.add_argument(
        "--order-loc-embeddings",
        action="store_true",
        help="initialise the <loc> embeddings with sinusoidal features of their bin (for models trained from scratch)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="LoRA: also write OUT/merged, a standalone checkpoint with the adapters folded in (in the base's "
        "dtype; on a quantized base each adapted layer is re-quantized with its own bits)",
    )
    p.add_argument(
        "--merge-dtype",
        choices=NAMES,
        default=None,
        help="with --merge: write OUT/merged as a float checkpoint in this dtype (a quantized base is dequantized)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(FinetuneOptions) if hasattr(args, f.name)}
    opts = FinetuneOptions(**values)

    def body() -> int:
        if opts.dry_run:
            opts.check()
            est, available, length = plan(opts, mx.distributed.init().size())
            what = f"{'full' if opts.full else 'LoRA'} fine-tuning, batch {opts.batch_size}, sequence {length}"
            print(est.report(available, what))
            return 0
        result = finetune(opts)
        if mx.distributed.init().rank() == 0:
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(f"{result.out}: {result.steps} steps, train loss {result.train_loss:.4f}{val}")
        return 0

    return run_main(PROG, body)
