"""Token samplers and the repetition penalty, as mlx-lm's `sample_utils` computes them.

A copy rather than an import: `mlx_lm.sample_utils` imports the `mlx_lm` package, which imports
transformers (and torch), ~2.4 s before the first token for three small functions. The test
suite holds these equal to mlx-lm's on the same random seeds (tests/test_streaming.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import mlx.core as mx

Sampler = Callable[..., mx.array]  # sampler(logits, key=None)
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of likeliest tokens whose probability reaches `top_p`."""
    sorted_logits = mx.sort(logits, axis=-1)
    sorted_probs = mx.exp(sorted_logits.astype(mx.float32))
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    num_dropped = (mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logits, num_dropped, axis=-1)
    return mx.where(logits < threshold, -float("inf"), logits)


def apply_top_k(logits: mx.array, top_k: int) -> mx.array:
    """Keep the `top_k` likeliest tokens."""
    if top_k >= logits.shape[-1]:
        return logits
    dropped = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logits, dropped, mx.array(-float("inf"), logits.dtype), axis=-1)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """Greedy at temperature 0; otherwise top-p, then top-k filtering, then a categorical draw.

    `key`: draw with this random key instead of MLX's global generator (a seeded row of a batch)."""
    if temperature == 0:
        return lambda logits, key=None: greedy(logits)

    def sample(logits: mx.array, key: Optional[mx.array] = None) -> mx.array:
        if 0 < top_p < 1:
            logits = apply_top_p(logits, top_p)
        if top_k > 0:
            logits = apply_top_k(logits, top_k)
        return mx.random.categorical(logits * (1.0 / temperature), key=key)

    return sample


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Divide positive (multiply negative) logits of the last `context_size` tokens by `penalty`."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if len(tokens) > 0:
            tokens = tokens[-context_size:]
            selected = logits[:, tokens]
            logits[:, tokens] = mx.where(selected < 0, selected * penalty, selected / penalty)
        return logits

    return process
