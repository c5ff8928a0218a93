"""Float vs 8-bit vs 4-bit at the full paligemma-3b-pt-224 shape (random weights, no download).

    python benchmarks/bench_quantize.py --workdir /tmp/pg3b [--compute-dtype float32]

Builds the 3B-shape checkpoint in bf16 (~5.9 GB, tensor by tensor), quantizes it with
`python -m mlx_paligemma.quantize`, then loads each variant in its own process and reports
size on disk, load time, greedy decode speed and peak MLX memory. On Linux the worker
preloads MKL (see bench_generate.py). Random weights: the speed and size figures are real,
the text is not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(model: str, dtype: str | None, max_tokens: int) -> None:
    from bench_generate import preload_fast_blas

    blas = preload_fast_blas()
    import mlx.core as mx
    import numpy as np

    import mlx_paligemma as mp

    tic = time.perf_counter()
    m, processor = mp.load(model, dtype=dtype)
    load_time = time.perf_counter() - tic
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    mx.reset_peak_memory()
    result = mp.generate(m, processor, image, "caption en", max_tokens=max_tokens)
    s = result.stats
    print(json.dumps(dict(load_s=load_time, prefill_tps=s.prefill_tps, decode_tps=s.generation_tps,
                          generated=s.generation_tokens, peak_gb=mx.get_peak_memory() / 1e9,
                          dtype=str(m.dtype), blas=blas)))


def disk_gb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="where the checkpoints go (needs ~10 GB)")
    p.add_argument("--compute-dtype", default=None, help="dtype the float parts compute in (default: checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.compute_dtype, args.max_tokens)
        return 0

    work = Path(args.workdir)
    source = work / "paligemma-3b-shape-bf16"
    if not source.exists():
        sys.path.insert(0, str(ROOT / "tools"))
        from make_tiny_checkpoint import make_paligemma_3b_checkpoint

        tic = time.perf_counter()
        make_paligemma_3b_checkpoint(source)
        print(f"built {source} in {time.perf_counter() - tic:.0f}s", file=sys.stderr)
    variants = {"bf16 (float)": source}
    for bits in (8, 4):
        out = work / f"paligemma-3b-shape-{bits}bit"
        if not out.exists():
            tic = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mlx_paligemma.quantize", "--model", str(source), "--out", str(out),
                            "--bits", str(bits), "--group-size", str(args.group_size)], check=True)
            print(f"quantized to {bits} bits in {time.perf_counter() - tic:.0f}s", file=sys.stderr)
        variants[f"{bits}-bit (g{args.group_size})"] = out

    rows = []
    for name, path in variants.items():
        cmd = [sys.executable, __file__, "--workdir", args.workdir, "--worker", str(path),
               "--max-tokens", str(args.max_tokens)]
        if args.compute_dtype:
            cmd += ["--compute-dtype", args.compute_dtype]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append((name, disk_gb(path), json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"| weights | on disk GB | compute dtype | load s | prefill tok/s | decode tok/s | peak GB |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, size, r in rows:
        print(f"| {name} | {size:.2f} | {r['dtype'].replace('mlx.core.', '')} | {r['load_s']:.1f} | "
              f"{r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | {r['peak_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
