"""Peak memory and time of LoRA fine-tuning and generation, estimated (mlx_paligemma.memory) and measured.

    python -m benchmarks.bench_memory --preset tiny --workdir /tmp/bm
    python -m benchmarks.bench_memory --preset 3b --workdir /tmp/pg3b --bases bfloat16,4bit,float32 --steps 4

For each base (`float32`: the preset's checkpoint loaded in float32, what fine-tuning always did before;
`bfloat16`, `float16`: the preset built in that dtype; `4bit`, `8bit`, `mixed_4_6` ...: a checkpoint
quantized from the preset, QLoRA) one process runs `--steps` LoRA steps of batch
`--batch` (rank 8, attention layers) on noise images with short captions, and one process generates
`--max-tokens` tokens (`--modes` chooses). Each prints the estimate before loading, then the measured
peak (`mx.get_peak_memory`, which counts weights, activations and optimiser state), the time per
training step (median after the first, compiled, step) or the time to first token (vision + prefill; the
median of `--runs` after a warm-up, each on a new image),
and estimate / measured. A preset checkpoint is built once in `--workdir` and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOAT_BASES = ("float32", "bfloat16", "float16")


def _checkpoint(preset: str, workdir: Path, base: str) -> Path:
    """The preset (built once) or its quantization for `base` ("4bit", "8bit", or a mixed recipe)."""
    from mlx_paligemma.quantize import quantize
    from tools.presets import PRESET_DTYPES, build_preset

    src = workdir / preset
    if not (src / "config.json").exists():
        build_preset(preset, src, replace=True)
    if base == "float32" or base == PRESET_DTYPES[preset]:
        return src  # float32: the preset's own checkpoint, cast on loading (as fine-tuning used to)
    if base in FLOAT_BASES:  # a checkpoint stored in that dtype: no cast (and no cast's peak) on loading
        out = workdir / f"{preset}-{base}"
        if not (out / "config.json").exists():
            build_preset(preset, out, dtype=base, replace=True)
        return out
    out = workdir / f"{preset}-{base}"
    if not (out / "config.json").exists():
        bits = int(base[: -len("bit")]) if base.endswith("bit") else None
        recipe = None if bits else base
        quantize(src, out, bits=bits, recipe=recipe, force=True, progress=lambda _: None)
    return out


def _write_data(directory: Path, n: int, image_size: int) -> Path:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(directory / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prefix": "caption en", "suffix": "a small red square"}))
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "train.jsonl"


def _lora_worker(args: argparse.Namespace, model_dir: Path, base: str) -> dict:
    import mlx.core as mx

    from mlx_paligemma import finetune as ft

    data = _write_data(Path(args.workdir) / "data", max(args.batch * (args.steps + 1), 4), 64)
    dtype = base if base in FLOAT_BASES else None
    opts = ft.FinetuneOptions(
        model=str(model_dir),
        data=str(data),
        out=str(Path(args.workdir) / f"out-{base}"),
        batch_size=args.batch,
        max_steps=args.steps,
        dtype=dtype,
        force=True,
        quiet=True,
        grad_checkpoint=args.grad_checkpoint,
    )
    est, available, length = ft.plan(opts)
    print(est.report(available, f"LoRA from {base}, batch {args.batch}, sequence {length}"), file=sys.stderr)
    times, last = [], [time.perf_counter()]

    def tick(step, model, processor, info):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    mx.reset_peak_memory()
    ft.finetune(opts, callback=tick)
    measured = mx.get_peak_memory()
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"estimate": est.total, "measured": measured, "seconds": step, "what": "s/step"}


def _generate_worker(args: argparse.Namespace, model_dir: Path, base: str) -> dict:
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    import mlx_paligemma as mp
    from mlx_paligemma.memory import available_memory, estimate_generate

    dtype = base if base in FLOAT_BASES else None
    est = estimate_generate(model_dir, dtype=dtype, batch=1, text_tokens=8, max_tokens=args.max_tokens)
    print(est.report(available_memory(), f"generate from {base}"), file=sys.stderr)
    mx.reset_peak_memory()
    model, processor = mp.load(model_dir, dtype=dtype)
    rng = np.random.default_rng(0)  # a new image per run: a cached image's features would skip the vision tower
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(args.runs + 1)]
    mp.generate(model, processor, images[0], "caption en", max_tokens=2)  # warm-up (compilation, caches)
    times = []
    for image in images[1:]:
        result = mp.generate(model, processor, image, "caption en", max_tokens=args.max_tokens)
        times.append(result.stats.vision_time + result.stats.prefill_time)
    return {
        "estimate": est.total,
        "measured": mx.get_peak_memory(),
        "seconds": statistics.median(times),
        "runs": [round(t, 4) for t in times],
        "what": f"s to first token (median of {args.runs})",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="tools/presets.py preset (tiny, mid, 3b, ...)")
    p.add_argument("--workdir", required=True, help="where checkpoints and outputs go (reused)")
    p.add_argument("--bases", default="float32,bfloat16,4bit", help="comma list: float dtypes, 4bit, 8bit, recipes")
    p.add_argument("--modes", default="lora,generate", help="lora, generate or both")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=1, help="generate: timed runs after the warm-up (median reported)")
    p.add_argument(
        "--grad-checkpoint", nargs="?", type=int, const=True, default=False, metavar="N", help="all layers, or N"
    )
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "BASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    if args.worker:
        import mlx_paligemma  # noqa: F401  the fast BLAS first

        mode, base = args.worker
        model_dir = _checkpoint(args.preset, workdir, base)
        row = (_lora_worker if mode == "lora" else _generate_worker)(args, model_dir, base)
        print("ROW " + json.dumps(row))
        return 0

    rows = []
    print(f"{'mode':<9} {'base':<10} {'estimate GB':>11} {'measured GB':>11} {'est/meas':>8}  time")
    for mode in args.modes.split(","):
        for base in args.bases.split(","):
            _checkpoint(args.preset, workdir, base)  # built here, so the worker's peak is its own
            cmd = [sys.executable, "-m", "benchmarks.bench_memory", *(argv or sys.argv[1:]), "--worker", mode, base]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                print(f"{mode} {base}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                return 1
            row = json.loads(next(line[4:] for line in run.stdout.splitlines() if line.startswith("ROW ")))
            row.update(mode=mode, base=base, preset=args.preset)
            rows.append(row)
            print(
                f"{mode:<9} {base:<10} {row['estimate'] / 1e9:11.3f} {row['measured'] / 1e9:11.3f} "
                f"{row['estimate'] / row['measured']:8.2f}  {row['seconds']:.3f} {row['what']}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
