"""The training loss: logits under the prefix-LM masks and suffix-token cross-entropy (with optional
`<loc>` smoothing). The models' GELU and softmax are fast on the CPU by themselves (`models/fast_math.py`)."""

from __future__ import annotations

import functools
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..errors import PaliGemmaError
from ..models import Model
from ..models.paligemma import prefix_lm_masks
from ..processor import Processor


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
