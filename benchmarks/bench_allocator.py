"""Time to first token and decode speed with the package's glibc malloc settings (`mlx_paligemma.allocator`)
and with glibc's defaults (`MLX_PALIGEMMA_MALLOC=system`), each in its own process, alternating.

    python -m benchmarks.bench_allocator --preset mid --workdir /tmp/bm --bases float32,4bit
    python -m benchmarks.bench_allocator --model DIR --rounds 3

Every generation is on a new image (no vision-feature cache hit), so the time to first token is the
vision tower + the prefill + the first logits, as a new request sees it. Per setting it prints the
medians over all rounds, the page faults per generation (`ru_minflt`) and the process's peak resident
memory (`ru_maxrss`: what keeping freed heap costs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"package": {}, "system": {"MLX_PALIGEMMA_MALLOC": "system"}}


def _worker(model_dir: str, runs: int, max_tokens: int) -> dict:
    import resource

    import numpy as np
    from PIL import Image

    import mlx_paligemma as mp
    from mlx_paligemma import allocator

    model, processor = mp.load(model_dir)
    processor.tokenizer.eos_id = -1  # every generation decodes exactly max_tokens
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(runs + 1)]
    mp.generate(model, processor, images[0], "caption en", max_tokens=2)  # warm-up (compilation, caches)
    ttft, tps, faults = [], [], []
    for image in images[1:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        r = mp.generate(model, processor, image, "caption en", max_tokens=max_tokens)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        ttft.append(r.stats.vision_time + r.stats.prefill_time)
        tps.append(r.stats.generation_tps)
    return {
        "malloc": allocator.describe(),
        "ttft_s": ttft,
        "decode_tps": tps,
        "faults": faults,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a checkpoint folder")
    source.add_argument("--preset", help="tools/presets.py preset, built (with --bases) in --workdir")
    p.add_argument("--workdir", help="where preset checkpoints are built and reused (with --preset)")
    p.add_argument("--bases", default="float32", help="with --preset: comma list of float32, 4bit, 8bit, ...")
    p.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating (default 2)")
    p.add_argument("--runs", type=int, default=5, help="generations per process, each on a new image (default 5)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(_worker(args.worker, args.runs, args.max_tokens)))
        return 0
    if args.preset and not args.workdir:
        p.error("--preset needs --workdir")

    if args.model:
        models = {Path(args.model).name: Path(args.model)}
    else:
        import mlx_paligemma  # noqa: F401  the fast BLAS first
        from benchmarks.bench_memory import _checkpoint

        models = {base: _checkpoint(args.preset, Path(args.workdir), base) for base in args.bases.split(",")}
    print(f"{'model':<10} {'malloc':<8} {'TTFT s':>7} {'decode tok/s':>12} {'faults/gen':>10} {'max RSS MB':>10}")
    for name, model_dir in models.items():
        rows: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
        for _ in range(args.rounds):
            for setting, env in SETTINGS.items():
                cmd = [sys.executable, "-m", "benchmarks.bench_allocator", "--model", str(model_dir)]
                cmd += ["--runs", str(args.runs), "--max-tokens", str(args.max_tokens), "--worker", str(model_dir)]
                run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
                if run.returncode != 0:
                    print(f"{name} {setting}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                    return 1
                rows[setting].append(json.loads(next(x[4:] for x in run.stdout.splitlines() if x.startswith("ROW "))))
        for setting, done in rows.items():
            ttft = [t for row in done for t in row["ttft_s"]]
            tps = [t for row in done for t in row["decode_tps"]]
            faults = [f for row in done for f in row["faults"]]
            rss = max(row["max_rss_mb"] for row in done)
            print(
                f"{name:<10} {setting:<8} {statistics.median(ttft):7.3f} {statistics.median(tps):12.2f} "
                f"{statistics.median(faults):10.0f} {rss:10.0f}",
                flush=True,
            )
            print("  " + json.dumps({"ttft_s": [round(t, 3) for t in ttft], "malloc": done[0]["malloc"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
