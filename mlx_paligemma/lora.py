"""LoRA adapters for the MLX model: apply, save, load, merge.

A LoRA layer adds `scale * (x @ A) @ B` (A: in x r, B: r x out, B initialised to zero, scale =
alpha / r as in PEFT and the published PaliGemma recipes) to a frozen linear layer, plain or
quantized. Written here rather than imported from mlx-lm: `mlx_lm.tuner` imports transformers.

Adapters are saved on their own: `adapters.safetensors` (the trained tensors only) and
`adapter_config.json` (rank, alpha, which layers, the base model), and loaded onto a model with
`mp.load(model, adapter_path=...)`. `merge_lora` folds them into the base weights, giving a model
any loader (and the PyTorch backend) reads like any other checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import PaliGemmaError
from .fsutil import atomic_path, atomic_write_text

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """`base(x) + scale * (x @ lora_a) @ lora_b`, with `base` frozen (nn.Linear or nn.QuantizedLinear)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        self.linear = base
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def fuse(self) -> nn.Module:
        """The equivalent plain layer: W + scale * (A @ B)^T (a quantized base is dequantized, fused, and
        quantized again with its own settings)."""
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            weight = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits)
        else:
            weight = base.weight
        delta = (self.scale * (self.lora_a @ self.lora_b)).T.astype(weight.dtype)
        has_bias = "bias" in base
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        fused.weight = weight + delta
        if has_bias:
            fused.bias = base.bias
        if isinstance(base, nn.QuantizedLinear):
            fused = fused.to_quantized(group_size=base.group_size, bits=base.bits, mode=base.mode)
        return fused


def _targets(layers: str) -> tuple[str, ...]:
    if layers == "attn":
        return ATTN
    if layers == "all":
        return ATTN + MLP
    raise PaliGemmaError(f"lora layers: must be 'attn' or 'all', got {layers!r}")


def apply_lora(model: nn.Module, rank: int, alpha: float, layers: str = "attn", train_vision: bool = False) -> int:
    """Freeze `model` and wrap the decoder's attention (`attn`) or all (`all`) linear layers in LoRA
    layers, whose A and B are then the only trainable tensors. Returns how many layers were wrapped.

    `train_vision` is recorded by the caller; the vision tower itself is never LoRA-wrapped (it is
    either frozen or, with --train-vision, trained in full)."""
    if rank < 1:
        raise PaliGemmaError(f"lora rank: must be a positive integer, got {rank}")
    model.freeze()
    names = _targets(layers)
    count = 0
    for layer in model.language_model.layers:
        for part in (layer.self_attn, layer.mlp):
            for name in names:
                base = getattr(part, name, None)
                if base is not None and not isinstance(base, LoRALinear):
                    setattr(part, name, LoRALinear(base, rank, alpha))
                    count += 1
    return count


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRA layer by its fused plain layer, in place; returns how many."""
    count = 0
    for layer in model.language_model.layers:
        for part in (layer.self_attn, layer.mlp):
            for name, child in list(part.children().items()):
                if isinstance(child, LoRALinear):
                    setattr(part, name, child.fuse())
                    count += 1
    return count


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized linear and embedding by the float layer it stands for (in the dtype of
    its scales), in place; returns how many. `finetune --merge-dtype` writes a float checkpoint so."""
    replaced = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, mode=m.mode)
            if isinstance(m, nn.QuantizedEmbedding):
                layer = nn.Embedding(*weight.shape)
            else:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
                if "bias" in m:
                    layer.bias = m["bias"]
            layer.weight = weight
            replaced.append((path, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def save_adapters(
    model: nn.Module,
    out: Union[str, os.PathLike],
    base_model: str,
    rank: Optional[int] = None,
    alpha: Optional[float] = None,
    layers: Optional[str] = None,
    train_vision: bool = False,
) -> Path:
    """Write the trainable tensors (the adapters, plus the vision tower with --train-vision) and the
    adapter config into `out`, each file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    lora = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not lora:
        raise PaliGemmaError("save_adapters: the model has no LoRA layers")
    if rank is None:
        rank = lora[0].lora_a.shape[1]
    if alpha is None:
        alpha = lora[0].scale * rank
    if layers is None:
        wrapped = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, LoRALinear)}
        layers = "all" if wrapped & set(MLP) else "attn"
    with atomic_path(out / ADAPTER_WEIGHTS, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    config = {
        "format": "mlx-paligemma-lora",
        "base_model": str(base_model),
        "rank": int(rank),
        "alpha": float(alpha),
        "layers": layers,
        "train_vision": bool(train_vision),
    }
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(adapter_path: Union[str, os.PathLike]) -> dict:
    path = Path(adapter_path).expanduser()
    cfg_file = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise PaliGemmaError(f"{path}: adapter directory not found")
    if not cfg_file.is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise PaliGemmaError(f"{path}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(cfg_file.read_text())
        int(cfg["rank"]), float(cfg["alpha"]), str(cfg["layers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PaliGemmaError(f"{cfg_file}: malformed adapter config ({e})") from None
    return cfg


def load_adapters(model: nn.Module, adapter_path: Union[str, os.PathLike]) -> nn.Module:
    """Wrap `model` as the adapter config says and load the adapter tensors (every one must fit)."""
    path = Path(adapter_path).expanduser()
    cfg = read_adapter_config(path)
    apply_lora(model, int(cfg["rank"]), float(cfg["alpha"]), str(cfg["layers"]))
    weights = mx.load(str(path / ADAPTER_WEIGHTS))
    expected = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key not in expected:
            raise PaliGemmaError(f"{path / ADAPTER_WEIGHTS}: tensor {key!r} does not belong to this model")
        if tuple(expected[key].shape) != tuple(value.shape):
            raise PaliGemmaError(
                f"{path / ADAPTER_WEIGHTS}: tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (adapters trained on a different base model?)"
            )
    dtype = model.dtype if hasattr(model, "dtype") else mx.float32
    model.load_weights([(k, v.astype(dtype) if ".lora_" not in k else v) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    return model
