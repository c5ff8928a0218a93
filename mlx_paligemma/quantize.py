"""`mlx-paligemma quantize` (`python -m mlx_paligemma.quantize`): write a quantized or float MLX checkpoint.

    mlx-paligemma quantize --model google/paligemma-3b-mix-224 --out paligemma-3b-mix-224-4bit --bits 4
    mlx-paligemma quantize --model google/paligemma-3b-mix-224 --out paligemma-3b-mix-224-q46 --recipe mixed_4_6

`--bits` 2, 3, 4, 5, 6 or 8 for every quantized layer; `--recipe mixed_L_H` (mlx-lm's and mlx-vlm's
recipes, after llama.cpp's Q4_K_M) gives H bits to the layers that hurt most when quantized (the
tied embedding / LM head, and v_proj and down_proj of the first and last eighth of the layers and
of every third layer between) and L bits to the rest, writing each layer's settings into
config.json's "quantization" entry under its module path, as mlx-lm does.

The decoder's linear layers and the tied embedding / LM head are quantized with MLX's affine
group quantization; the vision tower and projector stay float unless `--quantize-vision`
(their share of the weights is small and their accuracy matters for every token). The result
is self-contained (config with the mlx-community `"quantization"` entry, safetensors,
tokenizer and processor files, a model card) and is written to a temporary directory that is
renamed into place only when complete.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import resolve_model_dir
from .cli import ArgumentParser, main_entry, run_main
from .config import load_config
from .dtypes import NAMES
from .dtypes import dtype_name as dtype_name_of
from .errors import PaliGemmaError
from .fsutil import atomic_dir

BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization supports
GROUP_SIZES = (32, 64, 128)
RECIPES = {"mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}  # (low bits, high bits)
# Modes a checkpoint may name besides "affine" (MLX's microscaling float formats: no biases).
FLOAT_MODES = ("mxfp4", "mxfp8", "nvfp4")
MAX_SHARD_BYTES = 5 * 1024**3
EVAL_BATCH_ELEMENTS = 2**25  # ~32M weights (64 MB of bf16) evaluated together
PROGRESS_SECONDS = 5.0  # at most one progress line this often while tensors are converted
# Everything a checkpoint folder holds besides weights and config: tokenizer and processor files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "README.md"}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quantizable(path: str, module: nn.Module, group_size: int, quantize_vision: bool) -> bool:
    """Decoder linears and the embedding; vision/projector only on request; widths the group divides."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    if not (path.startswith("language_model.") or path == "lm_head" or quantize_vision):
        return False
    return module.weight.shape[-1] % group_size == 0


def recipe_predicate(recipe: str, num_layers: int, group_size: int, quantize_vision: bool = False) -> Callable:
    """`nn.quantize` predicate of a mixed recipe: settings per layer, or False for layers kept float.

    High bits for the embedding (the tied LM head) and for v_proj and down_proj in the first and last
    eighth of the decoder and every third layer between; low bits elsewhere (mlx-lm's rule).
    """
    if recipe not in RECIPES:
        raise PaliGemmaError(f"--recipe: must be one of {', '.join(RECIPES)}, got {recipe!r}")
    low, high = RECIPES[recipe]

    def predicate(path: str, module: nn.Module):
        if not quantizable(path, module, group_size, quantize_vision):
            return False
        index = -1
        if path.startswith("language_model.layers."):
            index = int(path.split(".")[2])
        more = index >= 0 and (
            index < num_layers // 8 or index >= 7 * num_layers // 8 or (index - num_layers // 8) % 3 == 2
        )
        if (more and path.endswith(("v_proj", "down_proj"))) or path.endswith(("embed_tokens", "lm_head")):
            return {"group_size": group_size, "bits": high, "mode": "affine"}
        return {"group_size": group_size, "bits": low, "mode": "affine"}

    return predicate


def layer_settings(quantization: dict) -> dict[str, object]:
    """The per-layer entries of a config "quantization" dict (mlx-lm's format: module path -> settings
    or False), keyed by our module paths whatever the writer's layout (mlx-vlm's `language_model.model.`)."""
    from .checkpoint import canonical_key

    return {
        canonical_key(f"{key}.weight")[: -len(".weight")]: value
        for key, value in quantization.items()
        if isinstance(value, (dict, bool))
    }


def global_settings(quantization: dict, where: str) -> dict:
    """group_size, bits and mode of a config "quantization" entry, checked."""
    try:
        settings = {"group_size": int(quantization["group_size"]), "bits": int(quantization["bits"])}
        settings["mode"] = str(quantization.get("mode", "affine"))
    except (KeyError, TypeError, ValueError):
        raise PaliGemmaError(
            f"{where}: malformed 'quantization' entry {quantization!r} (expected group_size and bits)"
        ) from None
    check_mode(settings["mode"], where)
    return settings


def check_mode(mode: str, where: str) -> None:
    if mode != "affine" and mode not in FLOAT_MODES:
        raise PaliGemmaError(f"{where}: quantization mode {mode!r} is not supported (affine, {', '.join(FLOAT_MODES)})")


def quantization_predicate(quantization: dict, stored: Optional[Callable[[str], bool]] = None) -> Callable:
    """`nn.quantize` predicate for a config "quantization" entry: a layer's own entry wins, else the
    global settings for the layers that are stored quantized (`stored(path)`: the loader asks the
    checkpoint) or, without `stored`, the layers the quantize tool quantizes (the estimator)."""
    default = global_settings(quantization, "config.json")
    per_layer = layer_settings(quantization)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        own = per_layer.get(path)
        is_stored = stored(path) if stored is not None else quantizable(path, module, default["group_size"], False)
        if own is False or not is_stored:
            return False
        settings = dict(default)
        if isinstance(own, dict):
            settings.update({k: own[k] for k in ("group_size", "bits", "mode") if k in own})
            check_mode(str(settings["mode"]), f"config.json quantization[{path!r}]")
        return settings

    return predicate


def _check_destination(src: Path, out: Path, force: bool) -> None:
    src, out = src.resolve(), out.resolve()
    if out == src or src in out.parents:
        raise PaliGemmaError(f"--out {out}: inside the source checkpoint {src}; choose a directory outside it")
    if out in src.parents:
        raise PaliGemmaError(f"--out {out}: contains the source checkpoint {src}; choose another directory")
    if out.exists() and not out.is_dir():
        raise PaliGemmaError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PaliGemmaError(f"--out {out}: exists and is not empty; pass --force to replace it")


def _write_weights(directory: Path, weights: dict[str, mx.array], progress: Callable[[str], None]) -> None:
    """Safetensors in shards of at most 5 GB (one file when it fits).

    The weights arrive lazy (read from the source and cast or quantized on demand) and are
    evaluated in small batches (`_batches`), so each source tensor is released as soon as its
    output exists: the process holds the output plus one batch of source tensors, never the float
    model as well (3B, 4-bit: 2.6 GB peak instead of 6.0 GB when the float model was loaded first).
    """
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key, array in weights.items():
        if shards[-1] and size + array.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total_bytes = sum(a.nbytes for a in weights.values())
    progress(f"converting {len(weights)} tensors ({total_bytes / 1e9:.2f} GB) into {len(shards)} file(s)")
    done, last_report = 0, time.monotonic()
    for name, shard in zip(names, shards):
        for batch in _batches(shard):
            mx.eval([shard[key] for key in batch])
            done += len(batch)
            if time.monotonic() - last_report >= PROGRESS_SECONDS:
                progress(f"  {done}/{len(weights)} tensors ({batch[-1]})")
                last_report = time.monotonic()
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        progress(
            f"  wrote {name} ({sum(a.nbytes for a in shard.values()) / 1e9:.2f} GB, {done}/{len(weights)} tensors)"
        )
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _batches(arrays: dict[str, mx.array]) -> list[list[str]]:
    """Keys in groups of about EVAL_BATCH_ELEMENTS elements: small enough that the source tensors
    of one group fit beside the output, large enough that MLX reads and converts them in parallel."""
    batches: list[list[str]] = [[]]
    count = 0
    for key, array in arrays.items():
        if batches[-1] and count + array.size > EVAL_BATCH_ELEMENTS:
            batches.append([])
            count = 0
        batches[-1].append(key)
        count += array.size
    return [b for b in batches if b]


def _model_card(
    src: str, bits: Optional[int], group_size: int, dtype: str, quantize_vision: bool, recipe: Optional[str] = None
) -> str:
    if bits is None and recipe is None:
        what = f"a {dtype} conversion"
    else:
        vision = "vision tower and projector included" if quantize_vision else f"vision tower and projector in {dtype}"
        kind = f"{bits}-bit" if recipe is None else f"{recipe} mixed-bit"
        what = f"{kind} (group size {group_size}) quantization of the decoder and its tied embedding; {vision}"
    return (
        f"# PaliGemma for MLX\n\nConverted from `{src}` with `mlx-paligemma quantize` on "
        f"{datetime.date.today().isoformat()}: {what}.\n\n"
        "```python\nimport mlx_paligemma as mp\n\n"
        'model, processor = mp.load("path/to/this/folder")\n'
        'print(mp.generate(model, processor, "cat.jpg", "caption en").text)\n```\n\n'
        "The licence of the source checkpoint applies.\n"
    )


def quantize(
    src: str | os.PathLike,
    out: str | os.PathLike,
    bits: Optional[int] = None,
    group_size: int = 64,
    dtype: Optional[str] = None,
    quantize_vision: bool = False,
    force: bool = False,
    progress: Callable[[str], None] = _log,
    recipe: Optional[str] = None,
) -> Path:
    """Write `src` (folder or hub id) to `out` as an MLX checkpoint, quantized when `bits` (every layer)
    or `recipe` (mixed bits, see RECIPES) is given."""
    from .load import load_model

    if bits is not None and bits not in BITS:
        raise PaliGemmaError(f"--bits: must be one of {', '.join(map(str, BITS))}, got {bits}")
    if bits is not None and recipe is not None:
        raise PaliGemmaError("--bits and --recipe: give one of them (a recipe sets the bits of every layer)")
    if recipe is not None and recipe not in RECIPES:
        raise PaliGemmaError(f"--recipe: must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if group_size not in GROUP_SIZES:
        raise PaliGemmaError(f"--group-size: must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    src_dir = resolve_model_dir(src)
    out = Path(out).expanduser()
    _check_destination(src_dir, out, force)
    q = load_config(src_dir).quantization  # also a clear error for a missing or broken config.json
    if q:
        what = f" ({q.get('bits')}-bit, group size {q.get('group_size')})" if isinstance(q, dict) else ""
        raise PaliGemmaError(
            f"{src_dir}: already quantized{what}; convert or quantize from the float checkpoint instead"
        )
    raw_config = json.loads((src_dir / "config.json").read_text())  # copied as is, only quantization added

    progress(f"reading {src}")
    model = load_model(src_dir, dtype, lazy=True)  # tensors are read (and freed) batch by batch when written
    dtype_name = dtype_name_of(model.dtype)
    per_layer: dict[str, dict] = {}
    if recipe is not None:
        chosen = recipe_predicate(recipe, model.config.text_config.num_hidden_layers, group_size, quantize_vision)

        def record(path: str, module: nn.Module):
            settings = chosen(path, module)
            if settings:
                per_layer[path] = settings
            return settings

        progress(
            f"quantizing with {recipe}: {RECIPES[recipe][1]} bits for the sensitive layers, "
            f"{RECIPES[recipe][0]} for the rest, group size {group_size}"
        )
        nn.quantize(model, class_predicate=record)
    elif bits is not None:
        skipped = sorted(
            path
            for path, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding))
            and (path.startswith("language_model.") or quantize_vision)
            and not quantizable(path, module, group_size, quantize_vision)
        )
        for path in skipped:
            progress(f"keeping {path} in {dtype_name}: its input width is not a multiple of {group_size}")
        progress(
            f"quantizing to {bits} bits, group size {group_size}"
            f"{'' if quantize_vision else f'; vision tower and projector stay {dtype_name}'}"
        )
        nn.quantize(
            model,
            group_size=group_size,
            bits=bits,
            class_predicate=lambda p, m: quantizable(p, m, group_size, quantize_vision),
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `out` and renamed into place when complete; an existing `out` (--force, or
    # an empty directory) is removed only then, so a failed run leaves it as it was.
    with atomic_dir(out, replace=True) as tmp:
        _write_weights(tmp, dict(tree_flatten(model.parameters())), progress)
        config = {k: v for k, v in raw_config.items() if k not in ("quantization", "quantization_config")}
        config["torch_dtype"] = dtype_name
        if bits is not None:
            config["quantization"] = config["quantization_config"] = {"group_size": group_size, "bits": bits}
        elif recipe is not None:  # mlx-lm's format: global settings (the low bits) and every layer's own
            low = {"group_size": group_size, "bits": RECIPES[recipe][0], "mode": "affine"}
            config["quantization"] = config["quantization_config"] = {**low, **per_layer}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in sorted(src_dir.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(_model_card(str(src), bits, group_size, dtype_name, quantize_vision, recipe))
    progress(f"wrote {out}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(
        prog="mlx-paligemma quantize",
        description="Convert a PaliGemma checkpoint to MLX, optionally quantized (2-8 bits, or a mixed recipe).",
    )
    p.add_argument("--model", required=True, help="source checkpoint directory or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--bits", type=int, choices=BITS, default=None, help="2-6 or 8 (default: no quantization)")
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="mixed bits: more for the embedding/LM head and some v_proj/down_proj (instead of --bits)",
    )
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="quantization group (64)")
    p.add_argument(
        "--dtype",
        choices=NAMES,
        default=None,
        help="float dtype of what is not quantized (default: the checkpoint's)",
    )
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower and projector too")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)

    def body() -> int:
        try:
            quantize(
                args.model,
                args.out,
                bits=args.bits,
                group_size=args.group_size,
                dtype=args.dtype,
                quantize_vision=args.quantize_vision,
                force=args.force,
                recipe=args.recipe,
            )
        except OSError as e:  # disk full, permission denied: the partial output is already removed
            print(f"{p.prog}: error: {e}; nothing was written to {args.out}", file=sys.stderr)
            return 1
        return 0

    return run_main(p.prog, body)


if __name__ == "__main__":
    main_entry(main)
