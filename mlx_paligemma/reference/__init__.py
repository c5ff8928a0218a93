"""The PyTorch backend: a from-scratch PaliGemma kept as the numerical reference of the MLX port.

    from mlx_paligemma import reference
    model, processor = reference.load("google/paligemma-3b-mix-224", device="mps", dtype="float32")
    logits = model(**processor(images=["cat.jpg"], prompts=["caption en"]))

One loader, two backends: the config parser, checkpoint index, strict check and processor
are the MLX backend's; only the modules (siglip, gemma, paligemma: same names, same
parameters, same methods as `mlx_paligemma.models`) and the device choice live here.

Importing this package sets, unless already set, `PYTORCH_ENABLE_MPS_FALLBACK=1` and
`PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.7` (plus a matching `PYTORCH_MPS_LOW_WATERMARK_RATIO`,
without which torch rejects a high ratio below 1.4), before it imports torch. They only take
effect if torch had not been imported yet (the fallback is read when torch loads) and had not
yet used MPS (the watermarks are read when the MPS allocator starts); otherwise export them
in the shell. `env.TORCH_WAS_IMPORTED_FIRST` says which case happened.
"""

from .env import apply_at_import

apply_at_import()

try:
    import torch  # noqa: E402,F401  (deliberately after the environment is set)
except ImportError as e:  # the README's plain install has no torch
    from ..errors import MissingDependencyError

    raise MissingDependencyError(
        "the PyTorch reference backend needs torch, which is not installed: pip install torch"
    ) from e

from .cache import (  # noqa: E402
    LayerCache,
    PrefixLMCache,
    prefix_lm_masks,  # noqa: E402
)
from .device import choose_device, choose_dtype, parse_dtype  # noqa: E402
from .load import load, load_model  # noqa: E402
from .paligemma import Model  # noqa: E402

__all__ = [
    "load",
    "load_model",
    "Model",
    "prefix_lm_masks",
    "PrefixLMCache",
    "LayerCache",
    "choose_device",
    "choose_dtype",
    "parse_dtype",
]
