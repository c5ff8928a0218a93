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

from ..config import PaliGemmaConfig
from ..errors import PaliGemmaError
from .gemma import LanguageModel
from .siglip import VisionModel

# Buffers some exporters save that are not weights.
_NON_WEIGHT_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")


class MultiModalProjector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


def prefix_lm_masks(attention_mask: mx.array, token_type_ids: mx.array,
                    sliding_window: Optional[int]) -> dict[str, Optional[mx.array]]:
    """Boolean (B, 1, L, L) masks, True where a query may attend a key.

    The diagonal is always open so padded query rows never see an all-masked softmax (their
    outputs are ignored; a NaN there would still poison nothing but is pointless work).
    """
    L = attention_mask.shape[1]
    q = mx.arange(L)[:, None]
    k = mx.arange(L)[None, :]
    causal = k <= q
    prefix = token_type_ids == 0
    both_prefix = prefix[:, :, None] & prefix[:, None, :]                  # (B, L, L)
    keep = attention_mask.astype(mx.bool_)[:, None, :]
    diagonal = q == k
    full = ((causal | both_prefix) & keep) | diagonal
    masks = {"full": full[:, None], "sliding": None}
    if sliding_window is not None:
        window = causal & (q - k < sliding_window)
        masks["sliding"] = (((window | both_prefix) & keep) | diagonal)[:, None]
    return masks


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
                f"got {counts.tolist()} tokens for {image_features.shape[0]} images")
        slot = mx.clip(mx.cumsum(is_image.astype(mx.int32), axis=1) - 1, 0, N - 1)   # (B, L)
        placed = mx.take_along_axis(image_features, slot[..., None], axis=1)
        return mx.where(is_image[..., None], placed.astype(h.dtype), h)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.language_model.logits(hidden, getattr(self, "lm_head", None))

    def __call__(self, input_ids: Any, pixel_values: Any = None, attention_mask: Any = None,
                 token_type_ids: Any = None, cache: Optional[list] = None) -> mx.array:
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

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The one place for checkpoint quirks once keys are canonical: buffers, tied head, conv layout."""
        weights = {k: v for k, v in weights.items() if not k.endswith(_NON_WEIGHT_SUFFIXES)}
        if self.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return self.vision_tower.sanitize(weights, prefix="vision_tower.")
