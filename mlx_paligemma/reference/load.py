"""`load()` of the PyTorch backend: a checkpoint folder or hub id -> torch model and processor.

The same config parser, checkpoint index, strict check and processor as the MLX backend.
The model is built on the meta device (no memory), then each tensor is read on its own with
`safetensors.safe_open(framework="pt")`, cast to the compute dtype, moved to the device and
assigned, so at most one tensor exists twice at a time; no pickle is ever read.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors import safe_open

from ..checkpoint import TensorInfo, check_tensors, open_checkpoint, resolve_model_dir
from ..config import load_config
from ..errors import CheckpointError
from ..processor import Processor
from .device import (
    SAFETENSORS_DTYPES,
    DeviceLike,
    as_tensor,
    choose_device,
    choose_dtype,
    parse_dtype,
    warn_if_env_too_late,
)
from .paligemma import Model


@dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor not read yet: what `Model.sanitize` sees instead of the data."""

    info: TensorInfo
    order: Optional[tuple[int, ...]] = None  # a pending permute (conv layout)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info.shape[i] for i in self.order) if self.order else self.info.shape

    def permute(self, *order: int) -> LazyTensor:
        return LazyTensor(self.info, tuple(order))

    def read(self, handle, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        try:
            t = handle.get_tensor(self.info.name)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{self.info.file}: cannot read tensor '{self.info.name}' ({e})") from None
        if self.order:
            t = t.permute(*self.order)
        if t.is_floating_point():
            t = t.to(dtype)
        return t.contiguous().to(device)


def load(
    path_or_repo_id: Union[str, os.PathLike], device: DeviceLike = None, dtype: Union[str, torch.dtype, None] = None
) -> tuple[Model, Processor]:
    """Load a PaliGemma 1 or 2 checkpoint on `device` (MPS > CUDA > CPU unless given).

    Computes in the checkpoint's dtype unless `dtype` is given ("float32", "bfloat16",
    "float16", "float64"); a dtype the device lacks falls back with a logged warning.
    """
    model_dir = resolve_model_dir(path_or_repo_id)
    model = load_model(model_dir, device, dtype)
    to_array = functools.partial(as_tensor, device=model.device)
    return model, Processor.from_dir(model_dir, model.config, to_array=to_array)


def load_model(
    model_dir: Union[str, os.PathLike], device: DeviceLike = None, dtype: Union[str, torch.dtype, None] = None
) -> Model:
    """The torch model alone, from a local checkpoint directory, in eval mode without gradients."""
    target = choose_device(device)
    warn_if_env_too_late(target)
    requested = parse_dtype(dtype)
    config = load_config(model_dir)
    if config.quantization:
        q = config.quantization if isinstance(config.quantization, dict) else {}
        raise CheckpointError(
            f"{model_dir}: a {q.get('bits', '?')}-bit quantized MLX checkpoint; the PyTorch reference reads "
            f"float checkpoints only: load it with the MLX backend, or give the float checkpoint it came from"
        )
    ckpt = open_checkpoint(model_dir)
    with torch.device("meta"):
        model = Model(config)

    weights = model.sanitize({key: LazyTensor(info) for key, info in ckpt.tensors.items()})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(ckpt, expected, {k: v.shape for k, v in weights.items()})

    if requested is None:
        code = weights["language_model.embed_tokens.weight"].info.dtype
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{ckpt.source('language_model.embed_tokens.weight')}: dtype {code} is not "
                f"a float type; choose a compute dtype explicitly (float32, bfloat16 or float16)"
            )
        requested = SAFETENSORS_DTYPES[code]
    compute_dtype = choose_dtype(requested, target)

    state = {}
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), framework="pt", device="cpu")) for path in ckpt.files}
        for key, lazy in weights.items():
            state[key] = lazy.read(handles[lazy.info.file], compute_dtype, target)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    return model.eval().requires_grad_(False)
