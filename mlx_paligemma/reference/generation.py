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

from .cache import PrefixLMCache
from .paligemma import Model


def to_mx(logits: torch.Tensor) -> mx.array:
    return mx.array(logits.float().cpu().numpy())


class TorchRunner:
    """Encode, prefill and step a reference `Model` with its prefix-LM cache."""

    def __init__(self, model: Model):
        self.model = model
        self.cache: PrefixLMCache | None = None

    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def prefill(self, input_ids: np.ndarray, features: torch.Tensor, attention_mask: np.ndarray) -> mx.array:
        self.cache = self.model.make_cache(attention_mask)
        return to_mx(self.model.prefill(input_ids, features, self.cache))

    def step(self, tokens: mx.array) -> mx.array:
        return to_mx(self.model.decode_step(np.asarray(tokens), self.cache))

    @staticmethod
    def concat_features(features: Sequence[Any]) -> torch.Tensor:
        return torch.cat(list(features), dim=0)

    def peak_memory_gb(self) -> float:
        """Peak device memory on CUDA, memory held by the MPS driver, else the process's peak RSS."""
        device = self.model.device
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "mps":
            return torch.mps.driver_allocated_memory() / 1e9
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
