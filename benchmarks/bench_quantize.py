"""Float vs 8-bit vs 4-bit at the full paligemma-3b-pt-224 shape (random weights, no download).

    python benchmarks/bench_quantize.py --workdir /tmp/pg3b
    python benchmarks/bench_quantize.py --workdir /tmp/pg3b --quantized-compute bfloat16,float32

Builds the 3B-shape checkpoint in bf16 (~5.9 GB, tensor by tensor; reused when complete),
quantizes it to 8 and 4 bits with `python -m mlx_paligemma.quantize` (timed, with the
process's peak memory), then runs every variant in its own process: size on disk, load time,
greedy generation of `--max-tokens` tokens after `caption en` (prefill and decode tokens/s)
and peak MLX memory (`mx.get_peak_memory`, reset after loading, so it counts the weights and
the generation working set). On Linux `import mlx_paligemma` preloads MKL (mlx_paligemma/blas.py).
Random weights: the speed and size figures are real, the text is not.

The float checkpoint runs with bf16 and float32 compute; quantized ones with float32 only by
default, because on a Linux CPU MLX's quantized matmul with bf16 activations runs at ~0.3
GFLOP/s (ten times slower than with float32, itself single-threaded): a 260-token prefill of
the 3B model would take about an hour. On Apple silicon all of this runs on the GPU instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script (it re-runs itself as a worker): tools.presets importable
NEEDED_GB = 13  # bf16 source 5.9 + 8-bit 3.5 + 4-bit 2.2, and room for a temporary copy


def max_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def run_worker(model: str, dtype: str | None, max_tokens: int) -> None:
    import mlx_paligemma as mp  # noqa: I001  first: it preloads the fast BLAS before mlx.core
    import mlx.core as mx
    import numpy as np

    blas = mp.blas.blas_report()["mlx_blas"]

    tic = time.perf_counter()
    m, processor = mp.load(model, dtype=dtype)
    load_time = time.perf_counter() - tic
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    mx.reset_peak_memory()
    result = mp.generate(m, processor, image, "caption en", max_tokens=max_tokens)
    s = result.stats
    print(
        json.dumps(
            dict(
                load_s=load_time,
                prompt_tokens=s.prompt_tokens,
                prefill_tps=s.prefill_tps,
                decode_tps=s.generation_tps,
                generated=s.generation_tokens,
                peak_gb=mx.get_peak_memory() / 1e9,
                rss_gb=max_rss_gb(),
                dtype=str(m.dtype).replace("mlx.core.", ""),
                blas=blas,
            )
        )
    )


def quantize_worker(source: str, out: str, bits: int, group_size: int) -> None:
    from mlx_paligemma.quantize import quantize

    tic = time.perf_counter()
    quantize(source, out, bits=bits, group_size=group_size, force=True)
    print(json.dumps(dict(seconds=time.perf_counter() - tic, rss_gb=max_rss_gb())))


def disk_gb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9


def child(*args: str) -> dict:
    """Run this script in a fresh process; its last stdout line is JSON. Its stderr passes through."""
    out = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"worker {' '.join(args)} failed with status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help=f"where the checkpoints go (needs ~{NEEDED_GB} GB free)")
    p.add_argument("--float-compute", default="bfloat16,float32", help="compute dtypes for the bf16 checkpoint")
    p.add_argument("--quantized-compute", default="float32", help="compute dtypes for the quantized ones")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--run-worker", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--quantize-worker", nargs=3, metavar=("SRC", "OUT", "BITS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_worker:
        run_worker(args.run_worker[0], args.run_worker[1], args.max_tokens)
        return 0
    if args.quantize_worker:
        quantize_worker(*args.quantize_worker[:2], int(args.quantize_worker[2]), args.group_size)
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "paligemma-3b-shape-bf16"
    if not (source / "config.json").is_file():  # written last: present means complete
        free_gb = shutil.disk_usage(work).free / 1e9
        if free_gb < NEEDED_GB:
            print(f"error: {work} has {free_gb:.0f} GB free; the benchmark needs ~{NEEDED_GB} GB", file=sys.stderr)
            return 2
        try:
            from tools.presets import PALIGEMMA_3B, make_spec_checkpoint
        except ImportError:
            print(
                "error: the benchmark builds its checkpoint with torch, which is not installed: pip install torch",
                file=sys.stderr,
            )
            return 2

        tic = time.perf_counter()
        make_spec_checkpoint(source, PALIGEMMA_3B, replace=True)
        print(f"built {source} in {time.perf_counter() - tic:.0f}s", file=sys.stderr)

    variants = [("bf16 (float)", source, dtype) for dtype in args.float_compute.split(",") if dtype]
    quantize_rows = []
    for bits in (8, 4):
        out = work / f"paligemma-3b-shape-{bits}bit-g{args.group_size}"
        q = child(
            "--workdir",
            args.workdir,
            "--group-size",
            str(args.group_size),
            "--quantize-worker",
            str(source),
            str(out),
            str(bits),
        )
        quantize_rows.append((bits, disk_gb(out), q))
        variants += [
            (f"{bits}-bit (g{args.group_size})", out, dtype) for dtype in args.quantized_compute.split(",") if dtype
        ]

    rows = []
    for name, path, dtype in variants:
        print(f"running {name} with {dtype} compute", file=sys.stderr)
        r = child("--workdir", args.workdir, "--max-tokens", str(args.max_tokens), "--run-worker", str(path), dtype)
        rows.append((name, disk_gb(path), r))

    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"MLX CPU with {rows[0][2]['blas']}; {rows[0][2]['prompt_tokens']} prompt tokens, "
        f"{args.max_tokens} new tokens (greedy)\n"
    )
    print("| quantization | on disk GB | shrink vs bf16 | quantize s | quantize peak RSS GB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for bits, size, q in quantize_rows:
        print(
            f"| {bits}-bit (g{args.group_size}) | {size:.2f} | {disk_gb(source) / size:.2f}x | "
            f"{q['seconds']:.0f} | {q['rss_gb']:.2f} |"
        )
    print()
    print(
        "| weights | on disk GB | compute dtype | load s | prefill tok/s | decode tok/s | tokens | "
        "peak MLX GB | peak RSS GB |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, size, r in rows:
        print(
            f"| {name} | {size:.2f} | {r['dtype']} | {r['load_s']:.1f} | {r['prefill_tps']:.2f} | "
            f"{r['decode_tps']:.2f} | {r['generated']} | {r['peak_gb']:.2f} | {r['rss_gb']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
