"""Score a checkpoint on held-out synthetic shapes scenes (tools/shapes.py): the demo model's report card.

    python -m benchmarks.eval_shapes --model demo [--images 200] [--backend mlx|torch] [--bits 8] [--json]
        [--adapter-path DIR] [--shapes circle,square,triangle,star] [--colours ...]

Metrics: caption exact match (and, per shape, whether the caption names its kind and its colour in its
place: a model that sees colours but not shapes scores high on one and at chance, 1/3, on the other),
counting accuracy, colour accuracy, detection mean IoU (each ground-truth object matched one-to-one,
greedily by IoU, to a predicted box; unmatched objects score 0) and recall at IoU 0.5 (overall and per
shape kind), how often a detection question about an absent shape is answered
empty, and the recall at IoU 0.5 of multi-class `detect a ; b` questions (each true object matched to a
predicted box of its own label). Scenes come from a fixed seed, never used for training. Greedy decoding.
A model quantized in memory (`--bits 8`) or on disk (a `mlx-paligemma quantize` directory) works alike.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from mlx_paligemma.cli import ArgumentParser
from tools import shapes

EVAL_SEED = 20261129  # training data uses small seeds (0, 1, ...)


def eval_scenes(n: int, seed: int = EVAL_SEED, vocab: shapes.Vocabulary = shapes.DEFAULT) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.make_scene(rng, vocab=vocab) for _ in range(n)]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_ious(truth: Sequence[Sequence[float]], predicted: Sequence[Sequence[float]]) -> list[float]:
    """For each true box, the IoU of the prediction matched to it (greedy one-to-one by IoU), 0 if none."""
    pairs = sorted(((iou(t, p), i, j) for i, t in enumerate(truth) for j, p in enumerate(predicted)), reverse=True)
    out, used_t, used_p = [0.0] * len(truth), set(), set()
    for value, i, j in pairs:
        if i in used_t or j in used_p or value <= 0:
            continue
        out[i] = value
        used_t.add(i)
        used_p.add(j)
    return out


def caption_objects(text: str) -> list[tuple[str, str]]:
    """The (colour, kind) pairs a caption names, left to right: `a red circle and a blue square` ->
    [("red", "circle"), ("blue", "square")]; words that are not `a|an COLOUR KIND` are skipped."""
    words = text.replace(",", " ").split()
    return [(words[i + 1], words[i + 2]) for i in range(len(words) - 2) if words[i] in ("a", "an")]


def questions(
    scenes: Sequence[shapes.Scene], vocab: shapes.Vocabulary = shapes.DEFAULT
) -> list[tuple[int, str, str, Any]]:
    """(scene index, task, prompt, expected) for every evaluated question.

    Expected: the answer text (caption, count, colour), the true boxes (detect, absent: none), or
    (label, box) pairs (multi). The multi-class questions draw from their own random stream, so the
    other questions are the same as before they were added."""
    rng = random.Random(EVAL_SEED + 1)
    multi_rng = random.Random(EVAL_SEED + 2)
    out = []
    for k, scene in enumerate(scenes):
        out.append((k, "caption", shapes.CAPTION_PROMPT, shapes.caption(scene)))
        out.append((k, "count", shapes.COUNT_PROMPT, str(len(scene.shapes))))
        kinds = scene.kinds()
        for kind in shapes.unique_kinds(scene, vocab):
            colour = next(s.colour for s in scene.shapes if s.kind == kind)
            out.append((k, "colour", shapes.colour_prompt(kind), colour))
        for kind in vocab.shapes:
            if kind in kinds:
                boxes = [s.box for s in scene.shapes if s.kind == kind]
                out.append((k, f"detect:{kind}", shapes.detect_prompt(kind), boxes))
        absent = [kind for kind in vocab.shapes if kind not in kinds]
        if absent:
            out.append((k, "absent", shapes.detect_prompt(rng.choice(absent)), []))
        if len(vocab.shapes) > 1:
            prompt, _ = shapes.ask(scene, "multi", multi_rng, vocab)
            pair = prompt.removeprefix("detect ").split(" ; ")
            out.append((k, "multi", prompt, [(s.kind, s.box) for s in scene.shapes if s.kind in pair]))
    return out


def evaluate(
    model: Any,
    processor: Any,
    n_images: int = 200,
    batch_size: int = 64,
    seed: int = EVAL_SEED,
    progress: bool = False,
    vocab: shapes.Vocabulary = shapes.DEFAULT,
) -> dict[str, float]:
    """Score `model` (either backend) on `n_images` held-out scenes; returns the metrics (fractions)."""
    from mlx_paligemma.generation import generate
    from mlx_paligemma.tasks import parse_detections

    scenes = eval_scenes(n_images, seed, vocab)
    images = [s.render() for s in scenes]
    qs = questions(scenes, vocab)
    answers: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(qs), desc="eval", unit="q", file=sys.stderr)
    for i in range(0, len(qs), batch_size):
        chunk = qs[i : i + batch_size]
        results = generate(model, processor, [images[q[0]] for q in chunk], [q[2] for q in chunk], max_tokens=40)
        answers += [r.text for r in results]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    hits: dict[str, list[float]] = {"caption": [], "count": [], "colour": [], "absent": [], "multi": []}
    named: dict[str, list[float]] = {"kind": [], "colour": []}
    ious: dict[str, list[float]] = {kind: [] for kind in vocab.shapes}
    size = (shapes.SIZE, shapes.SIZE)
    for (_k, task, _prompt, expected), got in zip(qs, answers):
        if task.startswith("detect:"):
            found = [d.box for d in parse_detections(got, size)]
            ious[task.split(":", 1)[1]] += match_ious(expected, found)
        elif task == "absent":
            hits["absent"].append(float(got.strip() == ""))
        elif task == "multi":
            found = parse_detections(got, size)
            for label in dict.fromkeys(kind for kind, _ in expected):
                truth = [box for kind, box in expected if kind == label]
                matched = match_ious(truth, [d.box for d in found if d.label == label])
                hits["multi"] += [float(v >= 0.5) for v in matched]
        else:
            hits[task].append(float(got.strip() == expected))
            if task == "caption":
                truth, said = caption_objects(expected), caption_objects(got)
                said += [("", "")] * (len(truth) - len(said))
                named["colour"] += [float(t[0] == g[0]) for t, g in zip(truth, said)]
                named["kind"] += [float(t[1] == g[1]) for t, g in zip(truth, said)]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    every_iou = [v for values in ious.values() for v in values]
    metrics = {
        "caption_exact": mean(hits["caption"]),
        "caption_kinds": mean(named["kind"]),
        "caption_colours": mean(named["colour"]),
        "counting": mean(hits["count"]),
        "colour": mean(hits["colour"]),
        "detection_miou": mean(every_iou),
        "detection_recall50": mean([float(v >= 0.5) for v in every_iou]),
        "absent_empty": mean(hits["absent"]),
        "multi_recall50": mean(hits["multi"]),
    }
    for kind, values in ious.items():
        metrics[f"detection_recall50_{kind}"] = mean([float(v >= 0.5) for v in values])
    metrics.update(images=n_images, questions=len(qs))
    return metrics


def load_backend(
    model: str,
    backend: str = "mlx",
    bits: Optional[int] = None,
    dtype: str = "float32",
    adapter_path: Optional[str] = None,
):
    """(model, processor) on `backend`; `bits` quantizes the MLX model in memory as the quantize CLI does;
    `adapter_path` applies a LoRA adapter from `mlx-paligemma finetune` (MLX)."""
    if backend == "torch":
        if bits or adapter_path:
            raise SystemExit("eval_shapes: --bits and --adapter-path apply to the MLX backend only")
        from mlx_paligemma.reference import load as load_torch

        return load_torch(model, device="cpu", dtype=dtype)
    import mlx.nn as nn

    from mlx_paligemma import load
    from mlx_paligemma.quantize import quantizable

    m, p = load(model, dtype=dtype, adapter_path=adapter_path)
    if bits:
        nn.quantize(m, group_size=64, bits=bits, class_predicate=lambda path, mod: quantizable(path, mod, 64, False))
    return m, p


TABLE_ROWS = (
    ("caption exact match", "caption_exact", True),
    ("  shapes' kinds named right", "caption_kinds", True),
    ("  shapes' colours named right", "caption_colours", True),
    ("counting accuracy", "counting", True),
    ("colour accuracy", "colour", True),
    ("detection mean IoU", "detection_miou", False),
    ("detection recall@0.5", "detection_recall50", True),
    ("absent shape -> empty", "absent_empty", True),
    ("multi-class recall@0.5", "multi_recall50", True),
)


def format_table(metrics: dict[str, float]) -> str:
    """The table rows, then the detection recall of each shape kind."""
    rows = list(TABLE_ROWS)
    kinds = [key.removeprefix("detection_recall50_") for key in metrics if key.startswith("detection_recall50_")]
    rows += [(f"  recall@0.5 {kind}", f"detection_recall50_{kind}", True) for kind in kinds]
    lines = [f"{'metric':<28}{'value':>8}"]
    for label, key, percent in rows:
        v = metrics[key]
        lines.append(f"{label:<28}{(f'{100 * v:.1f}%' if percent else f'{v:.3f}'):>8}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.eval_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="checkpoint directory or 'demo' (the shipped model)")
    p.add_argument("--images", type=int, default=200, help="held-out scenes")
    p.add_argument("--backend", choices=("mlx", "torch"), default="mlx")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None, help="quantize the MLX model in memory")
    p.add_argument("--adapter-path", default=None, help="a LoRA adapter from mlx-paligemma finetune, applied on top")
    p.add_argument("--shapes", default=None, help="comma-separated shape kinds of the scenes (tools/shapes.py)")
    p.add_argument("--colours", default=None, help="comma-separated colours of the scenes (tools/shapes.py)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help=f"scene seed (default {EVAL_SEED}, never trained on)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = p.parse_args(argv)
    try:
        vocab = shapes.Vocabulary.parse(args.shapes, args.colours)
    except shapes.ShapesError as e:
        p.error(f"--{e}")
    model, processor = load_backend(args.model, args.backend, args.bits, adapter_path=args.adapter_path)
    t0 = time.perf_counter()
    metrics = evaluate(model, processor, args.images, args.batch_size, args.seed, progress=True, vocab=vocab)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.model} ({args.backend}{f', {args.bits}-bit' if args.bits else ''}), {args.images} scenes")
        print(format_table(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
