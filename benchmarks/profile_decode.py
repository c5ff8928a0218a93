"""Where one MLX decode step's time goes: the weight reads (the bound) against everything else.

    python -m benchmarks.profile_decode --preset mid          # or --model DIR
    python -m benchmarks.profile_decode --model DIR --steps 32 --json

Each part is timed alone, evaluated synchronously, median of `--steps` repetitions: the whole step
as `stream_generate` runs it (pipelined), the decoder forward alone, its decoder layers alone, the
LM head alone, the prefix-LM masks, the sampler, the detokeniser and the host sync. The bound is
the weights read per token over the fp32 GEMV bandwidth measured here.
"""

# ruff: noqa: I001  (mlx_paligemma is imported before mlx.core on purpose: it preloads the fast BLAS)
from __future__ import annotations

import mlx_paligemma as mp
import mlx.core as mx
import numpy as np

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median_time(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def gemv_bandwidth(rows: int = 16384, cols: int = 4096, steps: int = 10) -> float:
    """GB/s MLX reaches reading a float32 matrix once per vector product (the decode bound)."""
    w = mx.random.normal((rows, cols))
    x = mx.random.normal((1, cols))
    mx.eval(w, x)
    return w.nbytes / _median_time(lambda: mx.eval(x @ w.T), steps) / 1e9


def profile(model_dir: str, steps: int = 16, prompt: str = "caption en") -> dict:
    from mlx_paligemma.generation import MLXRunner, _Detokenizer
    from mlx_paligemma.sampling import make_sampler
    from tests.helpers import noise_image

    model, processor = mp.load(model_dir)
    image = noise_image(224, 224)
    # The whole loop, as users run it: tokens/s over `steps` tokens after the first.
    mp.generate(model, processor, image, prompt, max_tokens=4)
    stats = mp.generate(model, processor, image, prompt, max_tokens=steps + 1).stats
    pipelined = 1.0 / stats.generation_tps

    runner = MLXRunner(model)
    batch = processor.encode_prompts([prompt])
    features = runner.encode_image(processor.preprocess_image(image)[None])
    logits = runner.prefill(batch["input_ids"], features, batch["attention_mask"])
    mx.eval(logits)
    tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    cache = runner.cache

    def forward():
        mx.eval(model.decode_step(tokens, cache))

    t_forward = _median_time(forward, steps)
    lm = model.language_model
    h = mx.random.normal((1, 1, lm.config.hidden_size)).astype(model.dtype)
    mx.eval(h)
    t_head = _median_time(lambda: mx.eval(model.logits(h[:, -1, :])), steps)
    t_masks = _median_time(lambda: mx.eval(cache.masks(1, None)), steps)
    sampler = make_sampler(temperature=0.0)
    logits = model.logits(h[:, -1, :])
    mx.eval(logits)
    t_sample = _median_time(lambda: mx.eval(sampler(logits).astype(mx.int32)), steps)
    detok = _Detokenizer(processor)
    ids = iter(np.random.default_rng(0).integers(1000, 3000, 10_000).tolist())
    for _ in range(steps):  # a realistic length of text so far
        detok.add(next(ids))
    t_detok = _median_time(lambda: detok.add(next(ids)), steps)
    small = mx.array([1], mx.int32)
    t_sync = _median_time(lambda: small.tolist(), steps)

    weight_bytes = sum(v.nbytes for k, v in _flat(model.language_model.parameters()))
    head_bytes = lm.embed_tokens.weight.nbytes
    bw = gemv_bandwidth()
    bound = weight_bytes / (bw * 1e9)
    return dict(
        blas=mp.blas.blas_report()["mlx_blas"],
        dtype=str(model.dtype),
        weights_gb=weight_bytes / 1e9,
        gemv_gbps=bw,
        bound_ms=bound * 1e3,
        step_ms=pipelined * 1e3,
        forward_ms=t_forward * 1e3,
        head_ms=t_head * 1e3,
        head_gb=head_bytes / 1e9,
        masks_ms=t_masks * 1e3,
        sample_ms=t_sample * 1e3,
        detok_ms=t_detok * 1e3,
        sync_ms=t_sync * 1e3,
        decode_tps=stats.generation_tps,
        bound_tps=1 / bound,
    )


def _flat(params):
    from mlx.utils import tree_flatten

    return tree_flatten(params)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", choices=["tiny", "mid", "3b"], help="build a random checkpoint instead")
    p.add_argument("--dtype", default=None, help="preset dtype")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tools.presets import build_preset

            model = str(build_preset(args.preset or "mid", Path(tmp) / "ckpt", dtype=args.dtype))
        r = profile(model, args.steps)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"BLAS {r['blas']}, {r['dtype']}, decoder weights {r['weights_gb']:.2f} GB, GEMV {r['gemv_gbps']:.1f} GB/s")
    print("| part of one decode step | ms |")
    print("| --- | ---: |")
    for key, label in [
        ("step_ms", "whole step, pipelined as stream_generate runs it"),
        ("forward_ms", "decoder forward alone (layers + head + masks)"),
        ("head_ms", f"LM head alone ({r['head_gb']:.2f} GB)"),
        ("masks_ms", "prefix-LM masks + position bookkeeping"),
        ("sample_ms", "greedy sampler"),
        ("detok_ms", "detokeniser, one token"),
        ("sync_ms", "host sync (tolist)"),
        ("bound_ms", "bound: weights / GEMV bandwidth"),
    ]:
        print(f"| {label} | {r[key]:.2f} |")
    print(
        f"decode {r['decode_tps']:.2f} tok/s = {r['decode_tps'] / r['bound_tps']:.0%} of the bound {r['bound_tps']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
