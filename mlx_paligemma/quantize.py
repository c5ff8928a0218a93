"""`mlx-paligemma quantize` (`python -m mlx_paligemma.quantize`): write a 4/8-bit or float MLX checkpoint.

    mlx-paligemma quantize --model google/paligemma-3b-mix-224 --out paligemma-3b-mix-224-4bit --bits 4

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

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
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


def _model_card(src: str, bits: Optional[int], group_size: int, dtype: str, quantize_vision: bool) -> str:
    if bits is None:
        what = f"a {dtype} conversion"
    else:
        vision = "vision tower and projector included" if quantize_vision else f"vision tower and projector in {dtype}"
        what = f"{bits}-bit (group size {group_size}) quantization of the decoder and its tied embedding; {vision}"
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
) -> Path:
    """Write `src` (folder or hub id) to `out` as an MLX checkpoint, quantized when `bits` is given."""
    from .load import load_model

    if bits is not None and bits not in BITS:
        raise PaliGemmaError(f"--bits: must be one of {', '.join(map(str, BITS))}, got {bits}")
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
    if bits is not None:
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
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in sorted(src_dir.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(_model_card(str(src), bits, group_size, dtype_name, quantize_vision))
    progress(f"wrote {out}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(
        prog="mlx-paligemma quantize",
        description="Convert a PaliGemma checkpoint to MLX, optionally quantized to 4 or 8 bits.",
    )
    p.add_argument("--model", required=True, help="source checkpoint directory or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--bits", type=int, choices=BITS, default=None, help="4 or 8 (default: no quantization)")
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
            )
        except OSError as e:  # disk full, permission denied: the partial output is already removed
            print(f"{p.prog}: error: {e}; nothing was written to {args.out}", file=sys.stderr)
            return 1
        return 0

    return run_main(p.prog, body)


if __name__ == "__main__":
    main_entry(main)
