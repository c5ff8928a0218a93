"""MLX modules of PaliGemma: siglip (vision), gemma (decoder), paligemma (merge), cache (KV cache and masks)."""

from .cache import LayerCache, PrefixLMCache, prefix_lm_masks
from .paligemma import Model

__all__ = ["Model", "prefix_lm_masks", "PrefixLMCache", "LayerCache"]
