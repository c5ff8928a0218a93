"""Time to first token and decode speed of a quantized checkpoint on the CPU with the two-stream half
products of `mlx_paligemma.cpu_layers` on and off, alternating in one process (so both see the same
machine state).

    python -m benchmarks.bench_split_products --model DIR [--iterations 6] [--max-tokens 24]

"off" raises `SPLIT_MIN_QUANTIZED` out of reach, so every product keeps one `quantized_matmul`; EOS is
ignored, so every generation decodes exactly `--max-tokens` tokens. Prints the medians and every run.
"""

# ruff: noqa: I001  (mlx_paligemma is imported first on purpose: it preloads the fast BLAS)
from __future__ import annotations

import mlx_paligemma as mp

import argparse
import json
import statistics
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from mlx_paligemma import cpu_layers


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a quantized checkpoint (mlx-paligemma quantize)")
    p.add_argument("--iterations", type=int, default=6, help="generations per setting (default 6)")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)
    model, processor = mp.load(args.model)
    processor.tokenizer.eos_id = -1
    rng = np.random.default_rng(0)  # a new image per generation: the first token's time includes the vision tower
    new_image = lambda: Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))  # noqa: E731
    thresholds = {"on": cpu_layers.SPLIT_MIN_QUANTIZED, "off": 2**62}
    mp.generate(model, processor, new_image(), "caption en", max_tokens=4)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in thresholds}
    try:
        for _ in range(args.iterations):
            for name, threshold in thresholds.items():
                cpu_layers.SPLIT_MIN_QUANTIZED = threshold
                r = mp.generate(model, processor, new_image(), "caption en", max_tokens=args.max_tokens)
                runs[name].append((r.stats.vision_time + r.stats.prefill_time, r.stats.generation_tps))
    finally:
        cpu_layers.SPLIT_MIN_QUANTIZED = thresholds["on"]
    for name, values in runs.items():
        row = {
            "halves": name,
            "ttft_s_median": round(statistics.median(t for t, _ in values), 3),
            "decode_tps_median": round(statistics.median(d for _, d in values), 2),
            "ttft_s": [round(t, 3) for t, _ in values],
            "decode_tps": [round(d, 2) for _, d in values],
        }
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
