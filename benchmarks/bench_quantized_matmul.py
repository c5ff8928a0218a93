"""MLX's CPU `quantized_matmul` against `dequantize` + float32 matmul and plain float32, by row count.

    python -m benchmarks.bench_quantized_matmul                 # 2048 -> 4096, rows 1..256, 4/8 bits, groups 32-128
    python -m benchmarks.bench_quantized_matmul --in 2048 --out 16384 --rows 1,256

What `mlx_paligemma/cpu_layers.py` decides from: the row count above which a quantized layer on the
CPU dequantizes its weight for the BLAS (DEQUANTIZE_MIN_ROWS). Best of `--repeats` timings each;
the ratio column is quantized_matmul time / dequantize + matmul time (> 1: dequantizing wins). Run
on a quiet machine: only ratios mean anything on a shared one.
"""

from __future__ import annotations

import argparse
import time


def best_time(fn, repeats: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def time_products(w, q, group: int, bits: int, rows: int, repeats: int) -> tuple[float, float, float]:
    """Seconds of `rows` x in @ W.T: quantized_matmul, dequantize + float32 matmul (cpu_layers), float32."""
    import mlx.core as mx

    from mlx_paligemma.cpu_layers import dequantized_matmul

    x = mx.random.normal((rows, w.shape[1]))
    mx.eval(x)
    product = dequantized_matmul(group, bits)
    quantized = best_time(lambda: mx.quantized_matmul(x, *q, transpose=True, group_size=group, bits=bits), repeats)
    return quantized, best_time(lambda: product(x, *q), repeats), best_time(lambda: x @ w.T, repeats)


def main(argv=None) -> int:
    # isort: off
    import mlx_paligemma  # noqa: F401  the fast BLAS, before mlx.core
    import mlx.core as mx

    # isort: on

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="in_dims", type=int, default=2048)
    p.add_argument("--out", dest="out_dims", type=int, default=4096)
    p.add_argument("--rows", default="1,4,8,16,64,256")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--group-sizes", default="32,64,128")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    w = mx.random.normal((args.out_dims, args.in_dims)) * 0.02
    print(f"{'bits':>4} {'group':>5} {'rows':>5} {'qmm ms':>9} {'deq+mm ms':>10} {'f32 ms':>8} {'qmm/deq':>8}")
    for bits in map(int, args.bits.split(",")):
        for group in map(int, args.group_sizes.split(",")):
            q = mx.quantize(w, group, bits)
            mx.eval(q)
            for rows in map(int, args.rows.split(",")):
                tq, td, tf = time_products(w, q, group, bits, rows, args.repeats)
                print(f"{bits:>4} {group:>5} {rows:>5} {tq * 1e3:9.2f} {td * 1e3:10.2f} {tf * 1e3:8.2f} {tq / td:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
