"""MLX modules of PaliGemma: siglip (vision), gemma (decoder), paligemma (merge and prefix mask)."""

from .paligemma import Model, prefix_lm_masks

__all__ = ["Model", "prefix_lm_masks"]
