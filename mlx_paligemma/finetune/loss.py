"""The training loss: logits under the prefix-LM masks, suffix-token cross-entropy (with optional
`<loc>` smoothing), and the fast GELU used while training."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import PaliGemmaError
from ..models import Model
from ..models.paligemma import prefix_lm_masks
from ..processor import Processor

# Eigen's rational approximation of tanh (float32 accurate to ~4e-7): MLX's CPU tanh is scalar and made
# GELU the most expensive op of a small model's training step.
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08)
_TANH_P += (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_GELU_C = math.sqrt(2 / math.pi)


def _fast_tanh(x: mx.array) -> mx.array:
    x = mx.clip(x, -7.90531110763549805, 7.90531110763549805)
    x2 = x * x
    p = _TANH_P[-1]
    for a in reversed(_TANH_P[:-1]):
        p = x2 * p + a
    q = _TANH_Q[-1]
    for b in reversed(_TANH_Q[:-1]):
        q = x2 * q + b
    return x * p / q


@mx.custom_function
def fast_gelu_approx(x: mx.array) -> mx.array:
    """`nn.gelu_approx` (tanh GELU) to within 1e-6, with an analytic gradient, using only multiply-adds."""
    return 0.5 * x * (1 + _fast_tanh(_GELU_C * (x + 0.044715 * x * x * x)))


@fast_gelu_approx.vjp
def _fast_gelu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    t = _fast_tanh(_GELU_C * (x + 0.044715 * x * x * x))
    d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)
    return (cotangent * d,)


@contextlib.contextmanager
def fast_activations():
    """While training, GELU runs as `fast_gelu_approx` (the models call `nn.gelu_approx` by name)."""
    original = nn.gelu_approx
    nn.gelu_approx = fast_gelu_approx
    try:
        yield
    finally:
        nn.gelu_approx = original


def forward(model: Model, batch: dict[str, mx.array], last: Optional[int] = None) -> mx.array:
    """Logits under the prefix-LM masks, with nothing that syncs (so it compiles); the data loader
    guarantees each row's image-token count (the check `Model.__call__` would do on the host).
    With `last`, logits of the last `last` positions only (left padding puts every suffix there)."""
    cfg = model.config
    h = model.embed_inputs(batch["input_ids"], model.encode_image(batch["pixel_values"]))
    masks = prefix_lm_masks(batch["attention_mask"], batch["token_type_ids"], cfg.text_config.sliding_window)
    hidden = model.language_model(h, masks)
    return model.logits(hidden if last is None else hidden[:, -last:])


def suffix_token_losses(
    logits: mx.array,
    batch: dict[str, mx.array],
    loc_range: Optional[tuple[int, int]] = None,
    loc_sigma: float = 0.0,
) -> tuple[mx.array, mx.array]:
    """Per-position losses (B, K-1) and their weights (1 on suffix tokens, 0 elsewhere), for logits of
    the last K positions.

    Position t-1 predicts token t; only suffix tokens (token_type_ids 1, not padding) count.
    With `loc_sigma` > 0 a `<loc>` target becomes a Gaussian over neighbouring bins (sigma in bins),
    so a near miss costs less than a far one and the loc tokens learn their order.
    """
    K = logits.shape[1]
    logits = logits[:, :-1].astype(mx.float32)
    targets = batch["input_ids"][:, -(K - 1) :]
    weights = (batch["token_type_ids"][:, -(K - 1) :] == 1) & (batch["attention_mask"][:, -(K - 1) :] == 1)
    weights = weights.astype(mx.float32)
    logz = mx.logsumexp(logits, axis=-1)
    nll = logz - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if loc_sigma > 0 and loc_range is not None:
        lo, hi = loc_range
        is_loc = (targets >= lo) & (targets < hi)
        soft = mx.take(_loc_targets(hi - lo, loc_sigma), mx.clip(targets - lo, 0, hi - lo - 1), axis=0)
        smooth = logz - (soft * logits[..., lo:hi]).sum(axis=-1)
        nll = mx.where(is_loc, smooth, nll)
    return nll, weights


@functools.lru_cache(maxsize=4)
def _loc_targets(bins: int, sigma: float) -> mx.array:
    """Row t: the Gaussian (sigma in bins) over bins centred on t, normalised."""
    j = np.arange(bins, dtype=np.float64)
    table = np.exp(-((j[None] - j[:, None]) ** 2) / (2 * sigma**2))
    return mx.array((table / table.sum(axis=1, keepdims=True)).astype(np.float32))


def suffix_loss(model: Model, batch: dict[str, mx.array], **kw: Any) -> mx.array:
    """Mean suffix-token cross-entropy of a batch (transformers' loss with `labels` from the processor)."""
    nll, w = suffix_token_losses(forward(model, batch), batch, **kw)
    return (nll * w).sum() / mx.maximum(w.sum(), 1)


def loc_token_range(processor: Processor) -> Optional[tuple[int, int]]:
    """Ids of `<loc0000>`..`<loc1023>` when they are consecutive (as in every PaliGemma vocabulary)."""
    tok = processor.tokenizer
    first, last = tok.piece_to_id("<loc0000>"), tok.piece_to_id("<loc1023>")
    if last - first != 1023 or first <= 3:
        return None
    return first, last + 1


def order_loc_embeddings(model: Model, processor: Processor, scale: Optional[float] = None) -> None:
    """Give the 1024 `<loc>` embeddings sinusoidal features of their bin index (many frequencies,
    as in transformer position encodings), so neighbouring bins start close and far ones apart.

    Meant for a model trained from scratch: with the tied head, a hidden state then scores a bin
    and its neighbours alike, which is what detection answers need.
    """
    rng = loc_token_range(processor)
    if rng is None:
        raise PaliGemmaError("order_loc_embeddings: the vocabulary has no consecutive <loc0000>..<loc1023>")
    lo, hi = rng
    emb = model.language_model.embed_tokens.weight
    D = emb.shape[1]
    pos = np.arange(hi - lo, dtype=np.float64)[:, None]
    freqs = np.exp(np.linspace(np.log(2 * np.pi / 2048), np.log(2 * np.pi / 4), D // 2))[None]
    table = np.concatenate([np.sin(pos * freqs), np.cos(pos * freqs)], axis=1)
    if table.shape[1] < D:
        table = np.pad(table, ((0, 0), (0, D - table.shape[1])))
    if scale is None:
        scale = float(np.asarray(mx.sqrt(mx.mean(emb.astype(mx.float32) ** 2))))
    table = table / np.sqrt(np.mean(table**2)) * scale
    new = mx.concatenate([emb[:lo], mx.array(table, dtype=emb.dtype), emb[hi:]], axis=0)
    model.language_model.embed_tokens.weight = new
