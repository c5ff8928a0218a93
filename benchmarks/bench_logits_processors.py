"""The engine's per-step cost of per-row logits processors, against none.

    python -m benchmarks.bench_logits_processors [--model DIR] [--rows 1,8] [--steps 100]

Two figures per batch size: whole decode steps (`mp.generate`, best of 5), and the sampling part
alone (`Engine._sample` on fixed logits, median of 200), where the processors' cost lives: rows with
a processor are sampled one by one (each row's processors see its own ids), plain greedy rows
with one argmax for the batch. The processors are a no-op and a one-token ban (a grammar's
mask is one such `where` per step); their own work is what a real processor adds on top.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx_paligemma as mp  # first: MLX gets the fast BLAS


def noop(tokens, logits):
    return logits


def ban(tokens, logits):
    logits[:, 5] = -float("inf")
    return logits


def main(argv: list[str] | None = None) -> int:
    from tests.helpers import noise_image

    p = argparse.ArgumentParser(prog="bench_logits_processors", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the tiny test model, built on the fly)")
    p.add_argument("--rows", default="1,8")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from tools.make_tiny_checkpoint import make_tiny_checkpoint

            path = make_tiny_checkpoint(Path(tmp) / "tiny", version=2, layout="transformers", weight_scale=0.5, seed=7)
        model, processor = mp.load(path)
        image = noise_image(60, 60)
        print("| rows | processors | ms per decode step | ms per sampling |")
        print("| ---: | --- | ---: | ---: |")
        for B in [int(b) for b in args.rows.split(",")]:
            for name, procs in (("none", []), ("no-op", [noop]), ("ban one token", [ban])):
                step, sample = measure(model, processor, image, B, procs, args.steps)
                print(f"| {B} | {name} | {1000 * step:.3f} | {1000 * sample:.3f} |")
    return 0


def measure(model, processor, image, B: int, procs: list, steps: int) -> tuple[float, float]:
    """(seconds per decode step, seconds per sampling of the batch's logits)."""
    import mlx.core as mx

    from mlx_paligemma.engine import Engine, Request, Row, SamplingOptions

    def run(n: int):
        return mp.generate(model, processor, [image] * B, ["caption en"] * B, max_tokens=n, logits_processors=procs)

    run(4)
    step = min(_timed(lambda: run(steps)) for _ in range(5)) / steps
    engine = Engine(model)
    ids = processor.prompt_ids("caption en")[0]
    rows = [Row(Request(ids, processor, options=SamplingOptions(logits_processors=procs))) for _ in range(B)]
    logits = mx.random.normal((B, model.config.text_config.vocab_size))
    mx.eval(logits)
    sample = statistics.median(_timed(lambda: mx.eval(engine._sample(rows, logits))) for _ in range(200))
    return step, sample


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


if __name__ == "__main__":
    sys.exit(main())
