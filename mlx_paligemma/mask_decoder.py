"""The segmentation mask decoder's checkpoint: find it, read it, check it strictly, convert it.

PaliGemma answers `segment cat` with four `<loc>` box tokens and sixteen `<seg>` codes per object.
The codes index the codebook of a small VQ-VAE trained by Google on OpenImages masks; its decoder
turns them into a 64x64 mask. big_vision publishes it as `vae-oid.npz`
(gs://big_vision/paligemma/vae-oid.npz, a numpy archive of PyTorch tensor names and layouts):

    _vq_vae._embedding                  (128, D)        the codebook
    decoder.0                           Conv2d(D, 128, 1)
    decoder.{2,3}.net.{0,2,4}           two residual blocks: Conv2d 3x3, 3x3, 1x1 (128 channels)
    decoder.{4,6,8,10}                  ConvTranspose2d(in, out, 4, stride=2, padding=1), out 128, 64, 32, 16
    decoder.12                          Conv2d(16, 1, 1)

This module is framework-free, like `checkpoint.py`: it resolves a file, a directory or a hub repo
id, reads `.npz` (never unpickling) or `.safetensors`, and checks every tensor by name and shape;
the backends' modules (`models/mask_decoder.py` for MLX, `reference/mask_decoder.py` for PyTorch)
only convert layouts at their door. The codebook width D is read from the file (checked against
`decoder.0`), so the check does not depend on one published value.
`python -m mlx_paligemma.convert_mask_decoder vae-oid.npz vae-oid.safetensors` writes the safetensors
copy (`convert` here).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import CheckpointError

NUM_CODES = 128  # codebook entries: <seg000>..<seg127>
CODES_PER_OBJECT = 16  # a 4x4 grid, row-major
GRID = 4
MASK_SIZE = 64  # decoder output, pixels per side
WIDTH = 128  # channels of the first conv and the residual blocks
UPSAMPLE_CHANNELS = (128, 64, 32, 16)  # outputs of the four transposed convolutions
UPSAMPLE_INDICES = (4, 6, 8, 10)  # their positions in the PyTorch `decoder` Sequential
CODEBOOK_KEY = "_vq_vae._embedding"
# The published file's name, in the order a directory is searched.
DECODER_FILE_NAMES = ("vae-oid.safetensors", "vae-oid.npz")
HUB_PATTERNS = ["*.npz", "*.safetensors", "*.md", "*.json"]
# Parts of a whole VQ-VAE state dict that the decoder does not use: skipped when present, so a file
# holding the encoder too still loads; any other unknown tensor is an error.
UNUSED_PREFIXES = ("encoder.", "_encoder.", "_pre_vq_conv.", "_vq_vae._ema")

PathLike = Union[str, os.PathLike]


def expected_shapes(codebook_dim: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the decoder, by its name in `vae-oid.npz`, with its PyTorch shape."""
    shapes: dict[str, tuple[int, ...]] = {CODEBOOK_KEY: (NUM_CODES, codebook_dim)}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        shapes[f"{name}.weight"] = (out, inp, k, k)
        shapes[f"{name}.bias"] = (out,)

    conv("decoder.0", WIDTH, codebook_dim, 1)
    for block in (2, 3):
        conv(f"decoder.{block}.net.0", WIDTH, WIDTH, 3)
        conv(f"decoder.{block}.net.2", WIDTH, WIDTH, 3)
        conv(f"decoder.{block}.net.4", WIDTH, WIDTH, 1)
    inp = WIDTH
    for index, out in zip(UPSAMPLE_INDICES, UPSAMPLE_CHANNELS):
        shapes[f"decoder.{index}.weight"] = (inp, out, 4, 4)  # ConvTranspose2d: (in, out, kh, kw)
        shapes[f"decoder.{index}.bias"] = (out,)
        inp = out
    conv("decoder.12", 1, inp, 1)
    return shapes


def check_codes(codes: Any) -> np.ndarray:
    """(B, 16) integers in 0..127 as int32, or a PaliGemmaError saying what is wrong.

    Done on the host before a backend runs: an out-of-range index would otherwise read past the
    codebook silently (MLX) or fail deep inside the module (PyTorch).
    """
    arr = np.asarray(codes)
    if arr.ndim == 1 and arr.size == CODES_PER_OBJECT:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != CODES_PER_OBJECT:
        raise CheckpointError(f"mask decoder: codes must have shape (B, {CODES_PER_OBJECT}), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise CheckpointError(f"mask decoder: codes must be integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_CODES):
        raise CheckpointError(
            f"mask decoder: codes must be in 0..{NUM_CODES - 1}, got {int(arr.min())}..{int(arr.max())}"
        )
    return arr.astype(np.int32)


# --- finding and reading the file ------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _pick_in_directory(directory: Path) -> Path:
    for name in DECODER_FILE_NAMES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in (".npz", ".safetensors") and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(f"{directory}: no mask decoder here (expected vae-oid.npz or a .safetensors file)")
    names = ", ".join(p.name for p in candidates)
    raise CheckpointError(f"{directory}: several candidate mask decoders ({names}); pass the file itself")


def resolve_decoder_file(path_or_repo_id: PathLike) -> Path:
    """A file as it is; a directory's `vae-oid.*` (or its only .npz/.safetensors); `owner/name` from the hub."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _pick_in_directory(path)
    text = str(path_or_repo_id)
    if not _REPO_ID.match(text) or text.endswith((".npz", ".safetensors")):
        raise CheckpointError(f"{text}: no such file or directory, and not a hub repo id (owner/name)")
    from .checkpoint import _download

    return _pick_in_directory(_download(text, patterns=HUB_PATTERNS))


def read_tensors(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.npz` (allow_pickle=False: object arrays are refused) or `.safetensors` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix == ".npz":
        if not zipfile.is_zipfile(path):  # np.load would take any other file for a pickle
            raise CheckpointError(f"{path}: not a readable .npz archive (not a zip file)")
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except ValueError as e:  # pickled object arrays
            raise CheckpointError(f"{path}: holds pickled objects, which are never unpickled here ({e})") from None
        except (OSError, EOFError, KeyError) as e:
            raise CheckpointError(f"{path}: not a readable .npz archive ({e})") from None
    raise CheckpointError(f"{path}: expected a .npz or .safetensors mask decoder")


def _codebook_dim(tensors: dict[str, np.ndarray], path: Path) -> int:
    codebook = tensors.get(CODEBOOK_KEY)
    if codebook is None:
        raise CheckpointError(f"{path}: missing tensor '{CODEBOOK_KEY}' (the codebook, shape ({NUM_CODES}, D))")
    if codebook.ndim != 2:
        raise CheckpointError(f"{path}: tensor '{CODEBOOK_KEY}' has shape {codebook.shape}, expected ({NUM_CODES}, D)")
    return int(codebook.shape[1])


def check_decoder_tensors(tensors: dict[str, np.ndarray], path: PathLike) -> int:
    """Strict check: every missing, unexpected or mis-shaped tensor is named with the file. Returns D."""
    path = Path(path)
    dim = _codebook_dim(tensors, path)
    expected = expected_shapes(dim)
    found = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith(UNUSED_PREFIXES)}
    problems = [f"unexpected tensor '{k}'" for k in sorted(found.keys() - expected.keys())]
    problems += [f"missing tensor '{k}' (shape {expected[k]})" for k in sorted(expected.keys() - found.keys())]
    for key in sorted(found.keys() & expected.keys()):
        if found[key] != expected[key]:
            problems.append(f"tensor '{key}' has shape {found[key]}, expected {expected[key]}")
    for key in sorted(found.keys() & expected.keys()):
        if not np.issubdtype(tensors[key].dtype, np.floating):
            problems.append(f"tensor '{key}' has dtype {tensors[key].dtype}, expected a float type")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: {problems[0]}{more}")
    return dim


def load_decoder_tensors(path_or_repo_id: PathLike) -> tuple[dict[str, np.ndarray], Path]:
    """The decoder's tensors (float32, PyTorch names and layouts, unused parts dropped) and their file."""
    path = resolve_decoder_file(path_or_repo_id)
    tensors = read_tensors(path)
    check_decoder_tensors(tensors, path)
    used = {k: v for k, v in tensors.items() if not k.startswith(UNUSED_PREFIXES)}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in used.items()}, path


def load_mask_decoder(path_or_repo_id: PathLike, backend: str = "mlx", device: Optional[str] = None):
    """The mask decoder on a backend: `vae-oid.npz`, a `.safetensors` converted from it, a folder, or a hub id.

    `backend="mlx"` gives `models.mask_decoder.MaskDecoder`, `"torch"` the PyTorch reference twin
    (on `device`, default: the best available). Both are called the same way:
    `decoder(codes)` maps a backend array of (B, 16) codes to (B, 64, 64) float32 logits in the
    same backend, and `decoder.decode(codes)` takes and returns numpy (codes checked first).
    """
    if backend not in ("mlx", "torch"):
        raise CheckpointError(f"load_mask_decoder: backend must be 'mlx' or 'torch', got {backend!r}")
    if device is not None and backend != "torch":
        raise CheckpointError("load_mask_decoder: device applies to backend='torch' only")
    weights, _ = load_decoder_tensors(path_or_repo_id)
    if backend == "mlx":
        from .models.mask_decoder import MaskDecoder

        return MaskDecoder.from_weights(weights)
    from .reference.mask_decoder import MaskDecoder as TorchMaskDecoder

    return TorchMaskDecoder.from_weights(weights, device=device)


def convert(src: PathLike, dst: PathLike, force: bool = False) -> Path:
    """Write the decoder of `src` (.npz) as a .safetensors file with the same names and layouts, float32."""
    from safetensors.numpy import save_file

    from .fsutil import atomic_path

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output must end in .safetensors")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: exists; pass --force to overwrite it")
    if not dst.resolve().parent.is_dir():
        raise CheckpointError(f"{dst}: its directory does not exist")
    weights, path = load_decoder_tensors(src)
    with atomic_path(dst) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "source": path.name})
    return dst
