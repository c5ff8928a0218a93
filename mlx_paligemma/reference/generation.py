"""The shared generation loop's runner for the PyTorch backend (`mlx_paligemma.generation`).

The loop samples with MLX (`mlx_paligemma.sampling`), so logits leave here as float32 `mx.array`s (exact
for bf16/fp16 logits); everything before them stays torch on the model's device, and the
image features stay torch tensors so an `ImageEmbedding` can be reused across prompts.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
import torch

from ..engine import WeakModel
from .cache import PrefixLMCache
from .paligemma import Model


def to_mx(logits: torch.Tensor) -> mx.array:
    return mx.array(logits.float().cpu().numpy())


class TorchRunner:
    """Encode, prefill and step a reference `Model` for the engine. Rows may leave a batch (`filter`)
    but not join a running one: the engine admits new rows when the batch is empty."""

    supports_join = False
    model = WeakModel()

    def __init__(self, model: Model, stream: Any = None):
        self.model = model

    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def prefill(self, input_ids: np.ndarray, features: Sequence[torch.Tensor], attention_mask: np.ndarray):
        cache = self.model.make_cache(attention_mask)
        return cache, to_mx(self.model.prefill(input_ids, torch.cat(list(features), dim=0), cache))

    def step(self, cache: PrefixLMCache, tokens: mx.array) -> mx.array:
        return to_mx(self.model.decode_step(np.asarray(tokens), cache))

    def extend(self, cache: PrefixLMCache, other: PrefixLMCache) -> None:
        raise NotImplementedError("the torch backend does not add rows to a running batch")

    @staticmethod
    def filter(cache: PrefixLMCache, keep: list[int]) -> None:
        cache.filter(keep)

    @staticmethod
    def arrays(cache: PrefixLMCache) -> list:
        return []

    def feature_bytes(self) -> int:
        cfg = self.model.config
        return cfg.num_image_tokens * cfg.text_config.hidden_size * self.model.dtype.itemsize

    def peak_memory_gb(self) -> float:
        """Peak device memory on CUDA, memory held by the MPS driver, else the process's peak RSS."""
        device = self.model.device
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "mps":
            return torch.mps.driver_allocated_memory() / 1e9
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
