"""`load()`: a checkpoint folder or hub id -> MLX model and processor.

Tensors are read with `mx.load`, which maps them lazily; the model's parameters are replaced
by those lazy arrays (cast to the compute dtype on the way) and evaluated once, so the
process never holds a second full copy of the weights.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import canonical_key, check_tensors, open_checkpoint, resolve_model_dir
from .config import load_config
from .cpu_layers import use_cpu_layers
from .dtypes import mlx_dtypes
from .errors import CheckpointError, PaliGemmaError
from .models import Model
from .processor import Processor

DTYPES = mlx_dtypes()


def parse_dtype(dtype: Optional[str]) -> Optional[mx.Dtype]:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise PaliGemmaError(f"dtype: unsupported {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load(
    path_or_repo_id: str | os.PathLike,
    dtype: Optional[str] = None,
    adapter_path: Optional[str | os.PathLike] = None,
    *,
    shard: bool = False,
    shard_vision: bool = False,
) -> tuple[Model, Processor]:
    """Load a PaliGemma 1 or 2 checkpoint, computing in the dtype that is fast on the device.

    Without `dtype`: on the GPU the checkpoint's dtype, end to end; on the CPU float32 for bf16/f16
    checkpoints, because MLX's CPU half-precision kernels are scalar (float32 uses the BLAS, ~10-50x
    faster). The cast happens per tensor while loading: there is never a second copy. `dtype` wins.
    `adapter_path`: a LoRA adapter directory written by `mlx_paligemma.finetune`, applied on top.
    `shard=True` (under `mlx.launch`): split the language model over the ranks of
    `mx.distributed.init()` (see `sharding.py`); each rank reads only its part of every weight.
    `shard_vision=True` splits the vision tower too (default: every rank keeps it whole).
    """
    if shard_vision and not shard:
        raise PaliGemmaError("shard_vision=True needs shard=True")
    if shard and adapter_path is not None:
        raise PaliGemmaError(
            "adapter_path with shard=True: merge the adapter first (mlx-paligemma finetune --merge), "
            "then shard the merged checkpoint"
        )
    model_dir = resolve_model_dir(path_or_repo_id)
    model = load_model(model_dir, dtype, lazy=shard, float32_on_cpu=True)
    if shard:
        from .sharding import shard_model

        shard_model(model, shard_vision=shard_vision)
        # One at a time, largest first: each whole tensor is read, cut to this rank's part and freed before
        # the next, so the peak is about the rank's share (or the largest tensor plus its part, if more).
        for part in sorted((a for _, a in tree_flatten(model.parameters())), key=lambda a: a.nbytes, reverse=True):
            mx.eval(part)
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(model, adapter_path)
        model.eval()
    return model, Processor.from_dir(model_dir, model.config, to_array=mx.array)


def on_cpu() -> bool:
    """Whether MLX computes on the CPU (Linux, or a Mac with the CPU device chosen)."""
    return mx.default_device().type == mx.DeviceType.cpu


def load_model(
    model_dir: str | os.PathLike,
    dtype: Optional[str] = None,
    lazy: bool = False,
    *,
    float32_on_cpu: bool = False,
    float32_compute: bool = False,
) -> Model:
    """The MLX model alone, from a local checkpoint directory, in the checkpoint's dtype unless `dtype` is
    given (or, with `float32_on_cpu`, float32 when the default device is the CPU: what `load()` does).

    `float32_compute` (fine-tuning a half-precision base on the CPU): the linear and embedding weights
    stay in `dtype` (default: the checkpoint's) in memory, every other tensor is float32, and those
    layers compute in float32 (`cpu_layers.CastLinear`): half the memory of a float32 model without
    MLX's scalar CPU half-precision matmuls. Quantized layers always get `cpu_layers`' fast CPU path.

    `lazy=True` leaves every weight unevaluated: a tensor is read from disk only when something
    evaluates it. The quantize tool relies on this to convert a few tensors at a time, so its peak
    memory is about the output, not the whole float model on top.
    """
    compute_dtype = parse_dtype(dtype)
    config = load_config(model_dir)
    ckpt = open_checkpoint(model_dir)
    model = Model(config)

    weights: dict[str, mx.array] = {}
    for path in ckpt.files:
        try:
            arrays = mx.load(str(path))
        except (RuntimeError, ValueError) as e:  # the header check passed, yet MLX cannot read it
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from None
        for name, array in arrays.items():
            weights[canonical_key(name)] = array
        arrays = array = None  # the source arrays may be freed as soon as their cast copies exist
    weights = model.sanitize(weights)
    if config.quantization:
        _quantize_like(model, config.quantization, weights, model_dir)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_tensors(ckpt, expected, {k: v.shape for k, v in weights.items()})

    if compute_dtype is None:  # the norm weight is float in float and quantized checkpoints alike
        compute_dtype = weights["language_model.norm.weight"].dtype
        if float32_on_cpu and on_cpu():
            compute_dtype = mx.float32
    kept = _half_weight_keys(model) if float32_compute and compute_dtype != mx.float32 else set()
    weights = {
        k: v.astype(compute_dtype if k in kept or not float32_compute else mx.float32)
        if mx.issubdtype(v.dtype, mx.floating)
        else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    del weights
    use_cpu_layers(model, half_weights=bool(kept))
    if not lazy:
        _eval_in_batches(model)
    model.eval()
    return model


def _eval_in_batches(model: Model, elements: int = 2**25) -> None:
    """Read (and cast) the weights a few tensors at a time: a float32 checkpoint loaded in bf16 then
    holds the bf16 model plus one batch of float32 tensors, not both whole models at once."""
    batch, count = [], 0
    for _, array in tree_flatten(model.parameters()):
        batch.append(array)
        count += array.size
        if count >= elements:
            mx.eval(batch)
            batch, count = [], 0
    mx.eval(batch)


def _half_weight_keys(model: Model) -> set[str]:
    """The weights of plain linear and embedding layers: the bulk of the model, kept half precision."""
    return {f"{path}.weight" for path, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}


def _quantize_like(model: Model, quantization: dict, weights: dict[str, mx.array], model_dir) -> None:
    """Turn exactly the layers the checkpoint stores quantized (those with `.scales`) into quantized
    layers before loading, so no float copy of them is ever built. Each layer takes its own entry of
    config.json's "quantization" (mlx-lm's per-layer format: mixed recipes) or the global settings;
    works for our files and mlx-vlm's (mlx-community) alike, whichever layers they quantized."""
    from .quantize import quantization_predicate

    where = f"{model_dir}/config.json"
    if not isinstance(quantization, dict):
        raise PaliGemmaError(f"{where}: malformed 'quantization' entry {quantization!r} (expected group_size and bits)")
    try:
        predicate = quantization_predicate(quantization, stored=lambda path: f"{path}.scales" in weights)
    except PaliGemmaError as e:
        raise PaliGemmaError(str(e).replace("config.json", where, 1)) from None
    try:
        nn.quantize(model, class_predicate=predicate)
    except (ValueError, RuntimeError) as e:  # a mode or bit width this MLX (or device) cannot compute
        raise PaliGemmaError(f"{where}: this MLX cannot use the checkpoint's quantization ({e})") from None
