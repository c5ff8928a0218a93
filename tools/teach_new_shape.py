"""Teach the demo model a shape it has never seen, with LoRA, on a CPU in minutes; score it before and after.

    python -m tools.teach_new_shape WORK [--shape star] [--minutes 4] [--images 1500]

1. `WORK/data`: shapes scenes (tools/shapes.py) drawn from the demo's shapes plus the new one, with every
   question of the task (captions, counts, colours, detections, multi-class, absent shapes);
2. before: `benchmarks.eval_shapes` on held-out scenes with the new shape (its detection recall@0.5) and
   on the demo's own task (the old scores);
3. `mlx-paligemma finetune --model demo --lora-rank 16 --lora-layers all` for `--minutes` (wall clock),
   adapters in `WORK/adapter`;
4. after: the same two evaluations with the adapter, a table of both on stdout (and `WORK/report.json`),
   and the answers to `detect <shape>` on one held-out image, before and after.

The same steps by hand are in the README ("Teach it something new").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from mlx_paligemma.cli import ArgumentParser, run_main
from mlx_paligemma.fsutil import atomic_write_text
from tools import shapes

PROG = "python -m tools.teach_new_shape"
DATA_SEED = 11  # training scenes; evaluation uses benchmarks.eval_shapes' own seed
SHOWN = ("caption_exact", "counting", "colour", "detection_miou", "detection_recall50", "absent_empty")


def finetune_options(work: Path, minutes: Optional[float], max_steps: Optional[int], lr: float, batch: int):
    from mlx_paligemma.finetune import FinetuneOptions

    return FinetuneOptions(
        model="demo",
        data=str(work / "data" / "data.jsonl"),
        out=str(work / "adapter"),
        lora_rank=16,
        lora_alpha=32.0,
        lora_layers="all",
        lr=lr,
        warmup=20,
        batch_size=batch,
        epochs=1000,
        time_budget=minutes,
        max_steps=max_steps,
        loc_smoothing=2.0,
        force=True,
        quiet=False,
    )


def scores(adapter: Optional[Path], new: shapes.Vocabulary, images: int) -> dict:
    """eval_shapes on scenes with the new shape, and on the demo's own task."""
    from benchmarks.eval_shapes import evaluate, load_backend

    model, processor = load_backend("demo", adapter_path=str(adapter) if adapter else None)
    return {
        "new": evaluate(model, processor, images, vocab=new),
        "old": evaluate(model, processor, images),
    }


def example_answers(adapter: Optional[Path], shape: str, new: shapes.Vocabulary) -> tuple[str, str]:
    """(image path, answer to `detect shape`) on the first held-out scene that holds the new shape."""
    from benchmarks.eval_shapes import eval_scenes, load_backend
    from mlx_paligemma.generation import generate

    scene = next(s for s in eval_scenes(200, vocab=new) if shape in s.kinds())
    model, processor = load_backend("demo", adapter_path=str(adapter) if adapter else None)
    text = generate(model, processor, [scene.render()], [shapes.detect_prompt(shape)], max_tokens=40)[0].text
    return shapes.detection(scene, shape), text


def table(before: dict, after: dict, shape: str) -> str:
    rows = [(f"{shape}: detection recall@0.5", "new", f"detection_recall50_{shape}")]
    rows += [(f"{shape} scenes: multi-class recall@0.5", "new", "multi_recall50")]
    rows += [(f"old task: {key}", "old", key) for key in SHOWN]
    lines = ["| measure | before | after |", "|---|---|---|"]
    for label, part, key in rows:
        fmt = (lambda v: f"{v:.3f}") if key == "detection_miou" else (lambda v: f"{100 * v:.1f}%")
        lines.append(f"| {label} | {fmt(before[part][key])} | {fmt(after[part][key])} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("work_dir", help="data/, adapter/ and report.json go here")
    p.add_argument("--shape", default="star", choices=shapes.EXTRA_SHAPES, help="the new shape (default star)")
    p.add_argument("--images", type=int, default=1500, help="training scenes (default 1500)")
    p.add_argument("--minutes", type=float, default=4.0, help="fine-tuning wall-clock budget (default 4)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after so many steps instead (tests)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-images", type=int, default=100, help="held-out scenes per evaluation (default 100)")
    args = p.parse_args(argv)
    work = Path(args.work_dir)

    def body() -> int:
        from mlx_paligemma.finetune import finetune

        new = shapes.Vocabulary(shapes.SHAPES + (args.shape,))
        if not (work / "data" / "data.jsonl").is_file():
            shapes.write_dataset(work / "data", args.images, DATA_SEED, 0.25, new, multi_detect=0.3)
        before = scores(None, new, args.eval_images)
        truth, answer_before = example_answers(None, args.shape, new)
        minutes = None if args.max_steps else args.minutes
        result = finetune(finetune_options(work, minutes, args.max_steps, args.lr, args.batch_size))
        adapter = work / "adapter"
        after = scores(adapter, new, args.eval_images)
        _, answer_after = example_answers(adapter, args.shape, new)
        report = {
            "shape": args.shape,
            "steps": result.steps,
            "minutes": round(result.seconds / 60, 2),
            "losses": [round(h["loss"], 4) for h in result.history],
            "before": before,
            "after": after,
            "example": {"truth": truth, "before": answer_before, "after": answer_after},
        }
        atomic_write_text(work / "report.json", json.dumps(report, indent=2) + "\n")
        print(table(before, after, args.shape))
        print(f"\n`detect {args.shape}` on a held-out scene: truth {truth!r}")
        print(f"  before: {answer_before!r}\n  after:  {answer_after!r}")
        print(f"{result.steps} steps in {result.seconds / 60:.1f} min; adapter in {adapter}", file=sys.stderr)
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
