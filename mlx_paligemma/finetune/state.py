"""What a run writes: adapters or a full checkpoint (in the source's dtype), and the resumable state."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoint import open_checkpoint, stored_dtype
from ..config import load_config
from ..errors import PaliGemmaError
from ..fsutil import atomic_path, atomic_write_text
from ..models import Model
from .options import FinetuneOptions

# Resume state lives in a subdirectory: checkpoint loaders read every *.safetensors at the top level.
STATE_DIR = "training_state"
STATE_FILE = f"{STATE_DIR}/state.json"
OPTIMIZER_FILE = f"{STATE_DIR}/optimizer.safetensors"
WEIGHTS_FILE = "model.safetensors"


# Files of the source checkpoint that a full fine-tune copies next to its weights.
_COPIED = ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_COPIED += ("preprocessor_config.json", "processor_config.json", "generation_config.json", "added_tokens.json")


def _copy_source_files(src: Path, dst: Path) -> None:
    for name in _COPIED:
        f = src / name
        if f.is_file() and not (dst / name).exists():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(f, tmp)


def write_checkpoint(model: Model, out: Path, src_dir: Path, dtype: Optional[str] = None) -> None:
    """The whole model as `model.safetensors` beside the source's config and tokenizer files: a checkpoint
    that `mp.load` (and the PyTorch backend) reads like any other. Float tensors are written in `dtype`
    (default: the source checkpoint's), whatever they were computed in. A model with no quantized layer
    from a quantized source (`--merge-dtype`) gets the source's config without its quantization entry."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or stored_dtype(open_checkpoint(src_dir))
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if not quantized and load_config(src_dir).quantization:
        config = json.loads((src_dir / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        config["torch_dtype"] = dtype
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    _copy_source_files(src_dir, out)
    target = getattr(mx, dtype)
    weights = {
        k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in tree_flatten(model.parameters())
    }
    with atomic_path(out / WEIGHTS_FILE, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})


def save_weights(model: Model, out: Path, opts: FinetuneOptions, src_dir: Path) -> None:
    """Full fine-tune: a complete checkpoint (`write_checkpoint`). LoRA: the adapters alone
    (`adapters.safetensors` + `adapter_config.json`)."""
    if opts.full:
        write_checkpoint(model, out, src_dir, opts.dtype)
    else:
        from ..lora import save_adapters

        save_adapters(
            model,
            out,
            base_model=opts.model,
            rank=opts.lora_rank,
            alpha=opts.lora_alpha,
            layers=opts.lora_layers,
            train_vision=opts.train_vision,
        )


def _save_training_state(
    out: Path, optimizer: optim.Optimizer, step: int, opts: FinetuneOptions, elapsed: float = 0.0
) -> None:
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    flat = dict(tree_flatten(optimizer.state))
    with atomic_path(out / OPTIMIZER_FILE, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), flat)
    atomic_write_text(
        out / STATE_FILE, json.dumps({"step": step, "elapsed": elapsed, "options": asdict(opts)}, indent=2) + "\n"
    )


def _load_training_state(
    out: Path, model: Model, optimizer: optim.Optimizer, opts: FinetuneOptions
) -> tuple[int, float]:
    state_file = out / STATE_FILE
    if not state_file.is_file():
        raise PaliGemmaError(f"--resume: {out} has no {STATE_FILE} (nothing saved to resume from)")
    state = json.loads(state_file.read_text())
    step, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
    if opts.full:
        saved = mx.load(str(out / WEIGHTS_FILE))
    else:
        from ..lora import ADAPTER_WEIGHTS

        saved = mx.load(str(out / ADAPTER_WEIGHTS))
    # A full checkpoint is written in the source's dtype: training goes on in the dtype it ran in.
    current = dict(tree_flatten(model.parameters()))
    model.load_weights([(k, v.astype(current[k].dtype) if k in current else v) for k, v in saved.items()], strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(out / OPTIMIZER_FILE)).items()))
    mx.eval(model.parameters(), optimizer.state)
    return step, elapsed
