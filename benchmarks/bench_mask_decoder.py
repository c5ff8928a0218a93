"""Time the segmentation mask decoder: N objects' codes -> (N, 64, 64) logits, on each backend.

    python -m benchmarks.bench_mask_decoder                      # random decoder, 100 objects
    python -m benchmarks.bench_mask_decoder --decoder vae-oid.npz --objects 100 --runs 5

Each backend runs in its own process (MLX with the fast BLAS the package loads on Linux, see
mlx_paligemma/blas.py; PyTorch on its default CPU threads): load, one warm-up call, then the median
of `--runs` calls of `decoder.decode(codes)` (numpy in, numpy out: the figure a caller sees),
wall-clock and CPU time (all threads).
A random decoder in the published layout (D = 512) is built when `--decoder` is not given; the
time depends only on the shapes, not the weights. Prints one JSON line per backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    import mlx_paligemma as mp

    blas = "torch's own" if args.backend == "torch" else mp.blas.blas_report()["mlx_blas"]

    tic = time.perf_counter()
    decoder = mp.load_mask_decoder(
        args.decoder, backend=args.backend, device="cpu" if args.backend == "torch" else None
    )
    load_time = time.perf_counter() - tic
    codes = np.random.default_rng(0).integers(0, 128, (args.objects, 16))
    decoder.decode(codes)  # warm-up
    times, cpu = [], []
    for _ in range(args.runs):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        decoder.decode(codes)
        times.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
    if args.backend == "mlx":
        import mlx.core as mx

        device = f"mlx {mx.default_device()}"
    else:
        import torch

        device = f"torch cpu, {torch.get_num_threads()} threads"
    row = {
        "backend": args.backend,
        "device": device,
        "blas": blas,
        "objects": args.objects,
        "median_s": round(statistics.median(times), 4),
        "ms_per_object": round(1000 * statistics.median(times) / args.objects, 3),
        "cpu_s": round(statistics.median(cpu), 4),  # all threads: less sensitive to a busy machine
        "load_s": round(load_time, 3),
    }
    print(json.dumps(row))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoder", default=None, help="vae-oid.npz or its safetensors (default: a random one)")
    p.add_argument("--objects", type=int, default=100)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--backends", default="mlx,torch")
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.backend:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        decoder = args.decoder
        if decoder is None:
            from tools.make_random_mask_decoder import make_random_mask_decoder

            decoder = str(make_random_mask_decoder(Path(tmp) / "vae-oid.npz"))
        for backend in args.backends.split(","):
            cmd = [sys.executable, "-m", "benchmarks.bench_mask_decoder", "--backend", backend, "--decoder", decoder]
            cmd += ["--objects", str(args.objects), "--runs", str(args.runs)]
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
