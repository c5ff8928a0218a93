"""PaliGemma in PyTorch, line for line with `models/paligemma.py`.

Prefix (image + prompt, token_type_ids 0) attends bidirectionally; suffix tokens attend to the
prefix and causally to each other; padding is never attended. Gemma 2 sliding layers use
"(causal and within the window) or (both in the prefix)", as the reference does.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..checkpoint import drop_non_weights
from ..config import PaliGemmaConfig
from ..errors import PaliGemmaError
from ..processor import check_image_tokens
from .cache import PrefixLMCache, prefix_lm_masks
from .device import as_tensor
from .gemma import LanguageModel
from .siglip import VisionModel


class MultiModalProjector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Model(nn.Module):
    """The whole VLM; `forward` returns logits at every position, like the reference."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionModel(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LanguageModel(config.text_config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    @torch.inference_mode()
    def encode_image(self, pixel_values: Any) -> torch.Tensor:
        """(B, 3, H, W) -> projected image features (B, N, text hidden), unscaled (transformers 5.x)."""
        return self.multi_modal_projector(self.vision_tower(as_tensor(pixel_values, self.device)))

    def embed_inputs(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor]) -> torch.Tensor:
        """Text embeddings with row b's image features written, in order, at row b's image tokens.

        Works wherever the image tokens sit (left padding moves them), unlike merges that
        assume they come first. The count of image tokens per row is checked before the model
        runs (`processor.check_image_tokens`), not here: reading it back would stall the device.
        """
        cfg = self.config
        is_image = input_ids == cfg.image_token_id
        text_ids = input_ids.masked_fill(is_image & (cfg.image_token_id >= cfg.text_config.vocab_size), 0)
        h = self.language_model.embed(text_ids)
        if image_features is None:
            return h
        N = image_features.shape[1]
        slot = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(0, N - 1)  # (B, L)
        placed = torch.gather(image_features, 1, slot[..., None].expand(-1, -1, image_features.shape[-1]))
        return torch.where(is_image[..., None], placed.to(h.dtype), h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.logits(hidden, getattr(self, "lm_head", None))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        cache: Optional[PrefixLMCache] = None,
    ) -> torch.Tensor:
        """Logits (B, L, vocab) at every position. Defaults: no padding, the whole input is prefix.

        With a `cache` (from `make_cache`), the first call is the prefill and later calls
        append suffix tokens; `attention_mask` then covers this call's tokens only, and the
        logits equal those of the full forward at the same positions.
        """
        if pixel_values is not None and not isinstance(input_ids, torch.Tensor):
            check_image_tokens(input_ids, len(pixel_values), self.config.num_image_tokens, self.config.image_token_id)
        features = self.encode_image(pixel_values) if pixel_values is not None else None
        return self.logits(self._hidden(input_ids, features, attention_mask, token_type_ids, cache))

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: Any,
        image_features: Optional[torch.Tensor],
        cache: PrefixLMCache,
        attention_mask: Any = None,
        token_type_ids: Any = None,
    ) -> torch.Tensor:
        """Run the prefix (image + prompt) bidirectionally into the cache; logits of the last position only."""
        return self.logits(self._hidden(input_ids, image_features, attention_mask, token_type_ids, cache)[:, -1])

    @torch.inference_mode()
    def decode_step(self, tokens: Any, cache: PrefixLMCache) -> torch.Tensor:
        """One causal (suffix) token per row: (B,) ids -> (B, vocab) logits."""
        tokens = as_tensor(tokens, self.device).reshape(-1, 1)
        return self.logits(self._hidden(tokens, None, None, None, cache)[:, -1])

    def _hidden(
        self,
        input_ids: Any,
        features: Optional[torch.Tensor],
        attention_mask: Any,
        token_type_ids: Any,
        cache: Optional[PrefixLMCache],
    ) -> torch.Tensor:
        input_ids = self._rows(input_ids, "input_ids")
        if attention_mask is None and cache is not None and cache.offset == 0 and cache.prefill_mask is not None:
            attention_mask = cache.prefill_mask
        attention_mask = (
            torch.ones_like(input_ids)
            if attention_mask is None
            else self._rows(attention_mask, "attention_mask", input_ids.shape)
        )
        if token_type_ids is not None:
            token_type_ids = self._rows(token_type_ids, "token_type_ids", input_ids.shape)
        elif cache is None or cache.offset == 0:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embed_inputs(input_ids, features)
        if cache is None:
            masks = prefix_lm_masks(attention_mask, token_type_ids, self.config.text_config.sliding_window)
        else:
            masks = cache.masks(attention_mask, token_type_ids)
        return self.language_model(h, masks, cache.layers if cache is not None else None)

    def _rows(self, x: Any, name: str, shape: Optional[torch.Size] = None) -> torch.Tensor:
        """A (B, L) tensor on the model's device; one row may be given as (L,)."""
        x = as_tensor(x, self.device)
        x = x[None] if x.ndim == 1 else x
        if shape is not None and x.shape != shape:
            raise PaliGemmaError(
                f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} like input_ids "
                f"(with a cache: this call's tokens only)"
            )
        return x

    def make_cache(self, attention_mask: Any = None) -> PrefixLMCache:
        """An empty cache; `attention_mask` (B, prefix length) is the padding of the prefill to come."""
        return PrefixLMCache(self.config.text_config, attention_mask)

    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """The one place for checkpoint quirks once keys are canonical: buffers, tied head, conv layout."""
        weights = drop_non_weights(weights, self.config.tie_word_embeddings)
        return self.vision_tower.sanitize(weights, prefix="vision_tower.")
