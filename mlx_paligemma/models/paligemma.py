"""PaliGemma: SigLIP features, linearly projected, placed at the image tokens of a Gemma prefix-LM.

Prefix (image + prompt, token_type_ids 0) attends bidirectionally; suffix tokens attend to the
prefix and causally to each other; padding is never attended. Gemma 2 sliding layers use
"(causal and within the window) or (both in the prefix)", as the reference does.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..checkpoint import drop_non_weights
from ..config import PaliGemmaConfig
from ..errors import PaliGemmaError
from ..processor import check_image_tokens
from .cache import PrefixLMCache, prefix_lm_masks
from .gemma import LanguageModel
from .siglip import VisionModel


class MultiModalProjector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


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

    def encode_image(self, pixel_values: Any) -> mx.array:
        """(B, 3, H, W) -> projected image features (B, N, text hidden), unscaled (transformers 5.x)."""
        return self.multi_modal_projector(self.vision_tower(mx.array(pixel_values)))

    def embed_inputs(self, input_ids: mx.array, image_features: Optional[mx.array]) -> mx.array:
        """Text embeddings with row b's image features written, in order, at row b's image tokens.

        Works wherever the image tokens sit (left padding moves them), unlike merges that
        assume they come first. The count of image tokens per row is checked before the model
        runs (`processor.check_image_tokens`), not here: reading it back would stall the device.
        """
        cfg = self.config
        is_image = input_ids == cfg.image_token_id
        text_ids = mx.where(is_image & (cfg.image_token_id >= cfg.text_config.vocab_size), 0, input_ids)
        h = self.language_model.embed(text_ids)
        if image_features is None:
            return h
        N = image_features.shape[1]
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
        cache: Optional[PrefixLMCache] = None,
    ) -> mx.array:
        """Logits (B, L, vocab) at every position. Defaults: no padding, the whole input is prefix.

        With a `cache` (from `make_cache`), the first call is the prefill and later calls
        append suffix tokens; `attention_mask` then covers this call's tokens only, and the
        logits equal those of the full forward at the same positions.
        """
        if pixel_values is not None and not isinstance(input_ids, mx.array):
            check_image_tokens(input_ids, len(pixel_values), self.config.num_image_tokens, self.config.image_token_id)
        features = self.encode_image(pixel_values) if pixel_values is not None else None
        return self.logits(self._hidden(input_ids, features, attention_mask, token_type_ids, cache))

    def prefill(
        self,
        input_ids: Any,
        image_features: Optional[mx.array],
        cache: PrefixLMCache,
        attention_mask: Any = None,
        token_type_ids: Any = None,
    ) -> mx.array:
        """Run the prefix (image + prompt) bidirectionally into the cache; logits of the last position only."""
        return self.logits(self._hidden(input_ids, image_features, attention_mask, token_type_ids, cache)[:, -1])

    def decode_step(self, tokens: Any, cache: PrefixLMCache) -> mx.array:
        """One causal (suffix) token per row: (B,) ids -> (B, vocab) logits."""
        tokens = mx.array(tokens).reshape(-1, 1)
        return self.logits(self._hidden(tokens, None, None, None, cache)[:, -1])

    def _hidden(
        self,
        input_ids: Any,
        features: Optional[mx.array],
        attention_mask: Any,
        token_type_ids: Any,
        cache: Optional[PrefixLMCache],
    ) -> mx.array:
        input_ids = self._rows(input_ids, "input_ids")
        if attention_mask is None and cache is not None and cache.offset == 0 and cache.prefill_mask is not None:
            attention_mask = cache.prefill_mask
        attention_mask = (
            mx.ones(input_ids.shape, mx.int32)
            if attention_mask is None
            else self._rows(attention_mask, "attention_mask", input_ids.shape)
        )
        if token_type_ids is not None:
            token_type_ids = self._rows(token_type_ids, "token_type_ids", input_ids.shape)
        elif cache is None or cache.offset == 0:
            token_type_ids = mx.zeros(input_ids.shape, mx.int32)
        h = self.embed_inputs(input_ids, features)
        if cache is None:
            masks = prefix_lm_masks(attention_mask, token_type_ids, self.config.text_config.sliding_window)
        else:
            masks = cache.masks(attention_mask, token_type_ids)
        return self.language_model(h, masks, cache.layers if cache is not None else None)

    @staticmethod
    def _rows(x: Any, name: str, shape: Optional[tuple[int, ...]] = None) -> mx.array:
        """A (B, L) array; one row may be given as (L,)."""
        x = mx.array(x)
        x = x[None] if x.ndim == 1 else x
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise PaliGemmaError(
                f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} like input_ids "
                f"(with a cache: this call's tokens only)"
            )
        return x

    def make_cache(self, attention_mask: Any = None) -> PrefixLMCache:
        """An empty cache; `attention_mask` (B, prefix length) is the padding of the prefill to come."""
        return PrefixLMCache(self.config.text_config, attention_mask)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The one place for checkpoint quirks once keys are canonical: buffers, tied head, conv layout."""
        weights = drop_non_weights(weights, self.config.tie_word_embeddings)
        return self.vision_tower.sanitize(weights, prefix="vision_tower.")
