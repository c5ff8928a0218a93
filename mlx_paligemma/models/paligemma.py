"""PaliGemma: SigLIP features, linearly projected, placed at the image tokens of a Gemma prefix-LM.

Prefix (image + prompt, token_type_ids 0) attends bidirectionally; suffix tokens attend to the
prefix and causally to each other; padding is never attended. Gemma 2 sliding layers use
"(causal and within the window) or (both in the prefix)", as the reference does.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoint import drop_non_weights
from ..config import PaliGemmaConfig
from ..errors import PaliGemmaError
from .gemma import LanguageModel
from .siglip import VisionModel


class MultiModalProjector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


def prefix_lm_masks(
    attention_mask: mx.array,
    token_type_ids: Optional[mx.array],
    sliding_window: Optional[int],
    query_positions: Optional[mx.array] = None,
    key_positions: Optional[mx.array] = None,
) -> dict[str, Optional[mx.array]]:
    """Boolean (B, 1, Lq, Lk) masks, True where a query may attend a key.

    Without positions, queries and keys are the L input tokens. With a cache, `key_positions`
    says which absolute position each cached slot holds (rotating caches reorder them) and
    `attention_mask` covers every position so far; `token_type_ids` then describes the queries,
    which after prefill are always suffix tokens (None). The diagonal, a token seeing itself,
    is always open, so padded query rows never meet an all-masked softmax.
    """
    L = attention_mask.shape[1]
    q = mx.arange(L) if query_positions is None else query_positions
    k = mx.arange(L) if key_positions is None else key_positions
    q, k = q[:, None], k[None, :]
    causal = k <= q
    keep = mx.take(attention_mask.astype(mx.bool_), k[0], axis=1)[:, None, :]  # (B, 1, Lk)
    if token_type_ids is not None:
        prefix = token_type_ids == 0
        both_prefix = prefix[:, :, None] & prefix[:, None, :]  # prefill: Lq == Lk
    else:
        both_prefix = mx.zeros((1, 1, 1), mx.bool_)
    diagonal = q == k
    masks = {"full": (((causal | both_prefix) & keep) | diagonal)[:, None], "sliding": None}
    if sliding_window is not None:
        window = causal & (q - k < sliding_window)
        masks["sliding"] = (((window | both_prefix) & keep) | diagonal)[:, None]
    return masks


class PrefixLMCache:
    """mlx-lm KV caches for every layer, plus where each cached slot sits in the sequence.

    Full-attention layers keep everything (`KVCache`); Gemma 2 sliding layers keep only the
    window (`RotatingKVCache`), which reorders slots. Two tiny caches of positions, updated
    exactly like the real ones, tell the mask which position each slot holds.
    """

    def __init__(self, model: Model, attention_mask: mx.array):
        # Imported on first use: mlx-lm's package import pulls in transformers and torch.
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        cfg = model.config.text_config
        self.window = cfg.sliding_window
        self.layers = [
            RotatingKVCache(max_size=self.window) if cfg.is_sliding(i) else KVCache()
            for i in range(cfg.num_hidden_layers)
        ]
        self._positions = {"full": KVCache(), "sliding": RotatingKVCache(max_size=self.window) if self.window else None}
        self.attention_mask = attention_mask  # (B, positions so far)
        # Read once (B x prompt length ints): without padding a decode step needs no mask (see `masks`).
        self.padded = not bool(np.asarray(attention_mask).all())

    @property
    def offset(self) -> int:
        return self._positions["full"].offset

    def masks(self, new_tokens: int, token_type_ids: Optional[mx.array]) -> dict[str, Optional[mx.array]]:
        """Register `new_tokens` more positions and return the masks for them."""
        B = self.attention_mask.shape[0]
        if self.offset > 0:
            self.attention_mask = mx.concatenate(
                [self.attention_mask, mx.ones((B, new_tokens), self.attention_mask.dtype)], axis=1
            )
        query = mx.arange(self.offset, self.offset + new_tokens)
        p = query.astype(mx.float32).reshape(1, 1, -1, 1)
        end = self.offset + new_tokens  # positions once these are registered
        masks = {}
        for kind, pos_cache in self._positions.items():
            if pos_cache is None:
                masks[kind] = None
                continue
            slots = pos_cache.update_and_fetch(p, p)[0].reshape(-1).astype(mx.int32)
            if new_tokens == 1 and not self.padded and (kind == "full" or end <= self.window):
                # Decode hot path: one suffix query, no padding, and every slot holds a position it may see
                # (all of them in full layers; in sliding ones while the sequence fits the window). Same
                # result as the all-True mask, without building it every step.
                masks[kind] = None
                continue
            masks[kind] = prefix_lm_masks(self.attention_mask, token_type_ids, self.window, query, slots)[kind]
        return masks

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)


class Model(nn.Module):
    """The whole VLM; `__call__` returns logits at every position, like the reference."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionModel(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LanguageModel(config.text_config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)

    @property
    def dtype(self) -> mx.Dtype:
        return self.language_model.norm.weight.dtype

    def encode_image(self, pixel_values: mx.array) -> mx.array:
        """(B, 3, H, W) -> projected image features (B, N, text hidden), unscaled (transformers 5.x)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed_inputs(self, input_ids: mx.array, image_features: Optional[mx.array]) -> mx.array:
        """Text embeddings with row b's image features written, in order, at row b's image tokens.

        Works wherever the image tokens sit (left padding moves them), unlike merges that
        assume they come first.
        """
        cfg = self.config
        is_image = input_ids == cfg.image_token_id
        text_ids = mx.where(is_image & (cfg.image_token_id >= cfg.text_config.vocab_size), 0, input_ids)
        h = self.language_model.embed(text_ids)
        if image_features is None:
            return h
        B, N = image_features.shape[:2]
        counts = np.asarray(is_image.sum(axis=1))
        if image_features.shape[0] != input_ids.shape[0] or (counts != N).any():
            raise PaliGemmaError(
                f"each row needs exactly {N} image tokens (id {cfg.image_token_id}) for its image; "
                f"got {counts.tolist()} tokens for {image_features.shape[0]} images"
            )
        slot = mx.clip(mx.cumsum(is_image.astype(mx.int32), axis=1) - 1, 0, N - 1)  # (B, L)
        placed = mx.take_along_axis(image_features, slot[..., None], axis=1)
        return mx.where(is_image[..., None], placed.astype(h.dtype), h)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.language_model.logits(hidden, getattr(self, "lm_head", None))

    def __call__(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        cache: Optional[list] = None,
    ) -> mx.array:
        """Logits (B, L, vocab) at every position. Defaults: no padding, the whole input is prefix."""
        input_ids = mx.array(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        attention_mask = mx.ones(input_ids.shape, mx.int32) if attention_mask is None else mx.array(attention_mask)
        token_type_ids = mx.zeros(input_ids.shape, mx.int32) if token_type_ids is None else mx.array(token_type_ids)
        features = self.encode_image(mx.array(pixel_values)) if pixel_values is not None else None
        h = self.embed_inputs(input_ids, features)
        masks = prefix_lm_masks(attention_mask, token_type_ids, self.config.text_config.sliding_window)
        return self.logits(self.language_model(h, masks, cache))

    def make_cache(self, attention_mask: mx.array) -> PrefixLMCache:
        return PrefixLMCache(self, mx.array(attention_mask))

    def prefill(
        self,
        input_ids: mx.array,
        image_features: Optional[mx.array],
        cache: PrefixLMCache,
        token_type_ids: Optional[mx.array] = None,
    ) -> mx.array:
        """Run the prefix (image + prompt) bidirectionally into the cache; logits of the last position only."""
        types = mx.zeros(input_ids.shape, mx.int32) if token_type_ids is None else token_type_ids
        h = self.embed_inputs(input_ids, image_features)
        hidden = self.language_model(h, cache.masks(input_ids.shape[1], types), cache.layers)
        return self.logits(hidden[:, -1, :])

    def decode_step(self, tokens: mx.array, cache: PrefixLMCache) -> mx.array:
        """One causal (suffix) token per row: (B,) ids -> (B, vocab) logits."""
        h = self.language_model.embed(tokens[:, None])
        hidden = self.language_model(h, cache.masks(1, None), cache.layers)
        return self.logits(hidden[:, -1, :])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The one place for checkpoint quirks once keys are canonical: buffers, tied head, conv layout."""
        weights = drop_non_weights(weights, self.config.tie_word_embeddings)
        return self.vision_tower.sanitize(weights, prefix="vision_tower.")
