"""What mlx-lm's generation does on Apple silicon for large models, as no-ops on the CPU.

On the GPU: while generating (on the engine's own stream, `engine.py`), the wired-memory limit is
raised to the GPU's recommended working set so the weights are not paged out between steps (a
3B model in bf16 is 5.9 GB, a large share of a 16 GB Mac); after each request the buffer cache
is cleared, so a long-running server does not keep the peak of the largest request. On the CPU
(Linux) none of this applies: the OS manages the memory and MLX's CPU buffers are reused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

logger = logging.getLogger(__name__)


def on_gpu() -> bool:
    """Whether MLX computes on the Metal GPU (a Mac with the default device left alone)."""
    return mx.default_device().type == mx.DeviceType.gpu and mx.metal.is_available()


def _device_info() -> dict:
    return mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()


@contextlib.contextmanager
def generation_session(model: nn.Module, stream: Any = None) -> Iterator[None]:
    """Wired limit raised while generating, buffer cache cleared after: GPU only, a no-op elsewhere.
    `stream`: the engine's, waited for before the limit goes back (mlx-lm does the same)."""
    if not isinstance(model, nn.Module) or not on_gpu():
        yield
        return
    limit = int(_device_info().get("max_recommended_working_set_size", 0))
    if not limit:
        yield
        return
    model_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if model_bytes > 0.9 * limit:
        logger.warning(
            "the model needs %d MB, close to this GPU's recommended working set of %d MB: generation may be slow "
            "(a quantized checkpoint helps)",
            model_bytes // 2**20,
            limit // 2**20,
        )
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        if stream is not None:
            mx.synchronize(stream)
        else:
            mx.synchronize()
        mx.set_wired_limit(old)
        mx.clear_cache()
