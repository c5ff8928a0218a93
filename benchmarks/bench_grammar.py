"""What the detect/segment grammar costs per decode step (`mlx_paligemma.grammar`).

    python -m benchmarks.bench_grammar --preset tiny
    python -m benchmarks.bench_grammar --preset mid --tokens 64 --runs 5 --batch 1,8 --json out.json

A constrained random model stops early (eos is legal after every object), so both settings block
eos to decode exactly `--tokens` tokens: "free" runs with that one processor per row, "grammar"
with the grammar's processor added; the difference is the grammar's cost per decode step (the
whole batch's step). Also timed alone: one processor call (mask built and evaluated) on logits
of the model's vocabulary.
"""

# ruff: noqa: I001  (mlx_paligemma is imported before mlx.core on purpose: it preloads the fast BLAS)
from __future__ import annotations

import mlx_paligemma as mp
import mlx.core as mx

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "detect cat ; red car ; bicycle"


def block_eos(eos: int):
    """A processor that never lets a row end (so every run decodes the same number of tokens)."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == eos, mx.array(-mx.inf, logits.dtype), logits)

    return process


def decode_ms(model, processor, batch: int, tokens: int, runs: int) -> dict[str, float]:
    """Median ms per decode step, "free" and "grammar", of `runs` greedy generations of exactly
    `tokens` tokens each, the two settings alternating (so a machine's drift hits both alike)."""
    from mlx_paligemma.grammar import answer_grammar
    from tests.helpers import noise_image

    images = [noise_image(224, 224, seed=i) for i in range(batch)]
    eos = processor.tokenizer.eos_id

    def rows(mode: str) -> list[list]:
        extra = [answer_grammar(processor, PROMPT)] if mode == "grammar" else []
        return [[*extra, block_eos(eos)] for _ in range(batch)]

    times: dict[str, list[float]] = {"free": [], "grammar": []}
    for run in range(runs + 1):
        for mode in times:
            results = mp.generate(
                model, processor, images, [PROMPT] * batch, max_tokens=tokens, logits_processors=rows(mode)
            )
            assert all(len(r.token_ids) == tokens for r in results)
            if run:  # the first round warms up
                times[mode].append(batch * 1e3 / results[0].stats.generation_tps)
    return {mode: statistics.median(t) for mode, t in times.items()}


def processor_call_us(processor, vocab: int, dtype: mx.Dtype, steps: int = 200) -> float:
    """One grammar step alone: advance over the last token, build the mask, apply it (evaluated)."""
    from mlx_paligemma.grammar import answer_grammar

    proc = answer_grammar(processor, PROMPT)
    logits = mx.random.normal((1, vocab)).astype(dtype)
    loc = processor.tokenizer.piece_to_id("<loc0100>")
    history = mx.array([loc] * 3, mx.int32)
    mx.eval(logits, history)
    times = []
    for _ in range(steps):
        proc.seen = 2  # advance over one token each call: the same ops as a decode step (the state may differ)
        tic = time.perf_counter()
        mx.eval(proc(history, logits))
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e6


def bench(model_dir: str, tokens: int, runs: int, batches: list[int]) -> dict:
    model, processor = mp.load(model_dir)
    vocab = model.config.text_config.vocab_size
    out = {
        "model": model_dir,
        "vocab": vocab,
        "prompt": PROMPT,
        "tokens": tokens,
        "processor_call_us": processor_call_us(processor, vocab, model.dtype),
        "rows": [],
    }
    for batch in batches:
        ms = decode_ms(model, processor, batch, tokens, runs)
        out["rows"].append(
            {
                "batch": batch,
                "free_ms_per_step": ms["free"],
                "grammar_ms_per_step": ms["grammar"],
                "grammar_cost_ms": ms["grammar"] - ms["free"],
                "grammar_overhead": ms["grammar"] / ms["free"] - 1,
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_grammar", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: build --preset)")
    p.add_argument("--preset", choices=["tiny", "mid"], default="tiny", help="random checkpoint to build (tiny)")
    p.add_argument("--tokens", type=int, default=48, help="tokens decoded per run (48)")
    p.add_argument("--runs", type=int, default=3, help="runs per setting, the median is reported (3)")
    p.add_argument("--batch", default="1,4", help="batch sizes, comma-separated (1,4)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        p.error(f"--batch: expected comma-separated integers, got {args.batch!r}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tools.presets import build_preset

            model = str(build_preset(args.preset, Path(tmp) / "ckpt"))
        r = bench(model, args.tokens, args.runs, batches)
    print(f"vocabulary {r['vocab']}, prompt {r['prompt']!r}, {r['tokens']} tokens per row")
    print(f"one grammar step alone: {r['processor_call_us']:.0f} us")
    print("| batch | ms/step, eos blocked | ms/step, + grammar | grammar ms/step | overhead |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in r["rows"]:
        print(
            f"| {row['batch']} | {row['free_ms_per_step']:.2f} | {row['grammar_ms_per_step']:.2f} "
            f"| {row['grammar_cost_ms']:.3f} | {row['grammar_overhead']:+.1%} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
