"""Dtype names, the one map from the names users type to each framework's dtypes.

Framework-free at import: `mlx_dtypes()` / `torch_dtypes()` import their framework when called,
so the PyTorch names cost nothing on an install without torch.
"""

from __future__ import annotations

from typing import Any

# Compute dtypes offered by `load(dtype=)` and every `--dtype` flag.
NAMES = ("float32", "bfloat16", "float16")
# The PyTorch reference also computes in float64 (a tighter oracle).
TORCH_NAMES = NAMES + ("float64",)
# safetensors dtype codes of float tensors, by the name of the dtype they hold.
SAFETENSORS_CODES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def mlx_dtypes() -> dict[str, Any]:
    import mlx.core as mx

    return {name: getattr(mx, name) for name in NAMES}


def torch_dtypes() -> dict[str, Any]:
    import torch

    return {name: getattr(torch, name) for name in TORCH_NAMES}


def dtype_name(dtype: Any) -> str:
    """`mx.bfloat16` or `torch.bfloat16` -> "bfloat16"."""
    return str(dtype).rsplit(".", 1)[-1]
