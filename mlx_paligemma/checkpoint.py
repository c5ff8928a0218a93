"""Find a checkpoint (folder or hub id), index its safetensors lazily, normalise key layouts.

Framework-free on purpose: both backends get the same file list, the same canonical tensor
names and the same strict check; each backend then reads the bytes its own lazy way
(`mx.load` for MLX, `safetensors.safe_open` for PyTorch), so no second copy of the weights
is ever held.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import CheckpointError

# Files a PaliGemma hub repository needs (weights, config, tokenizer, processor config).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.md"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DEMO_MODEL = "demo"  # the name of the shipped demo model (mlx_paligemma/demo)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Canonical names are the module tree of our models: `vision_tower.{embeddings,encoder,post_layernorm}`,
# `multi_modal_projector.linear`, `language_model.{embed_tokens,layers,norm}`, `lm_head`.
_KEY_RULES = [
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),  # hub layout
    (re.compile(r"^language_model\.model\."), "language_model."),  # hub layout
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]


def canonical_key(key: str) -> str:
    """Map a tensor name of any known layout to our module tree.

    Hub: `vision_tower.vision_model.*`, `language_model.model.*`; transformers 5.x
    save_pretrained: `vision_tower.*`, `language_model.*`; in-memory names may start with `model.`.
    """
    if key.startswith("model."):
        key = key[len("model.") :]
    for pattern, repl in _KEY_RULES:
        key = pattern.sub(repl, key)
    return key


def resolve_model_dir(path_or_repo_id: str | os.PathLike) -> Path:
    """A local folder as it is; anything shaped `owner/name` that is not a folder comes from the hub."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_repo_id) == DEMO_MODEL:  # the small model shipped in the package (a local `demo` dir wins)
        return Path(__file__).parent / "demo"
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory or a hub repo id")
    text = str(path_or_repo_id)
    if not _REPO_ID.match(text):
        raise CheckpointError(f"{text}: no such directory, and not a hub repo id (owner/name)")
    return _download(text)


def _download(repo_id: str, patterns: Optional[list[str]] = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns or HUB_PATTERNS))
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id}: this repository is gated; accept its licence on huggingface.co/{repo_id} "
            f"and log in (`hf auth login`) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: repository not found on the Hugging Face hub (check the id; for a private "
            f"repository set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: revision not found on the Hugging Face hub") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (
            "HF_HUB_OFFLINE is set: unset it to download, or pass a local directory"
            if offline
            else "the hub could not be reached: check the network, or pass a local directory"
        )
        raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and {hint}") from None
    except OSError as e:  # network and disk errors surface as OSError subclasses
        raise CheckpointError(f"{repo_id}: download failed ({e})") from None


@dataclass
class TensorInfo:
    file: Path
    name: str  # the name inside the file
    dtype: str  # safetensors dtype code, e.g. F32, BF16
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """A checkpoint directory: its config.json and an index of every tensor, by canonical name."""

    directory: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def source(self, key: str) -> str:
        """Where a canonical key came from, for error messages."""
        info = self.tensors.get(key)
        if info is None:
            return str(self.directory)
        return info.file.name if info.name == key else f"{info.file.name} (as '{info.name}')"


def _read_safetensors_header(path: Path) -> dict:
    """Only the JSON header (shapes and dtypes): nothing is read of the tensor data.

    The header also says where the data ends, so a file cut short (an interrupted download or
    copy) is caught here, by name, before any backend reads it and fails in its own words.
    """
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        file_size = path.stat().st_size
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (malformed header); download it again")
    header.pop("__metadata__", None)
    try:
        data_end = 8 + size + max((int(meta["data_offsets"][1]) for meta in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(
            f"{path}: not a readable safetensors file (malformed header); download it again"
        ) from None
    if file_size < data_end:
        raise CheckpointError(f"{path}: incomplete or corrupt ({file_size} of {data_end} bytes); download it again")
    return header


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is missing from {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory}: only pickle weights ({', '.join(pickles)}); they are never unpickled here "
            f"because unpickling can run arbitrary code. Convert them to safetensors first"
        )
    raise CheckpointError(f"{directory}: no *.safetensors weight files")


def open_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Index every tensor of a (sharded) safetensors checkpoint under its canonical name."""
    directory = Path(directory)
    ckpt = Checkpoint(directory)
    for path in _weight_files(directory):
        for name, meta in _read_safetensors_header(path).items():
            key = canonical_key(name)
            if key in ckpt.tensors:
                raise CheckpointError(
                    f"{path.name}: tensor '{name}' duplicates {ckpt.source(key)} (both map to '{key}')"
                )
            ckpt.tensors[key] = TensorInfo(path, name, meta["dtype"], tuple(meta["shape"]))
    return ckpt


def stored_dtype(ckpt: Checkpoint) -> str:
    """The float dtype the checkpoint stores (that of the final norm weight, float in quantized
    checkpoints too): what a file written from it keeps."""
    from .dtypes import SAFETENSORS_CODES

    info = ckpt.tensors.get("language_model.norm.weight")
    if info is None or info.dtype not in SAFETENSORS_CODES:
        raise CheckpointError(f"{ckpt.directory}: no float 'language_model.norm.weight' to tell its dtype")
    return SAFETENSORS_CODES[info.dtype]


# Buffers some exporters save that are not weights.
NON_WEIGHT_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")


def drop_non_weights(weights: dict, tie_word_embeddings: bool) -> dict:
    """Backend-independent sanitizing: drop saved buffers, and a stored copy of a tied LM head."""
    weights = {k: v for k, v in weights.items() if not k.endswith(NON_WEIGHT_SUFFIXES)}
    if tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


def patch_conv_layout(shape: tuple[int, ...], num_channels: int) -> str:
    """Layout of the stored patch-embedding conv: "OIHW" (PyTorch, the hub) or "OHWI" (MLX, mlx-vlm's
    conversions), recognised by where the input channels sit. Each backend transposes to its own."""
    return "OHWI" if len(shape) == 4 and shape[-1] == num_channels and shape[1] != num_channels else "OIHW"


def check_tensors(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """Strict load: every missing, unexpected or mis-shaped tensor is an error naming key and file.

    `expected` are the model's parameter shapes, `found` the checkpoint's shapes after the
    backend's sanitize step (both by canonical name).
    """
    problems = []
    for key in sorted(found.keys() - expected.keys()):
        problems.append(f"unexpected tensor '{key}' in {ckpt.source(key)}")
    for key in sorted(expected.keys() - found.keys()):
        problems.append(f"missing tensor '{key}' (shape {tuple(expected[key])})")
    for key in sorted(found.keys() & expected.keys()):
        if tuple(found[key]) != tuple(expected[key]):
            problems.append(
                f"tensor '{key}' in {ckpt.source(key)} has shape {tuple(found[key])}, expected {tuple(expected[key])}"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{ckpt.directory}: {problems[0]}{more}")
