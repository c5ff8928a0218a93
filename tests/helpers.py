"""Shared test helpers: the transformers oracle and synthetic images (fixtures live in conftest.py)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image


@functools.cache
def hf_model(model_dir: Path, dtype: str = "float32"):
    """The oracle: transformers' PaliGemmaForConditionalGeneration, eval mode, CPU."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def hf_logits(model_dir: Path, batch: dict) -> np.ndarray:
    """Reference logits (called with token_type_ids, as the reference doc requires)."""
    import torch

    model = hf_model(Path(model_dir))
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        out = model(
            input_ids=t["input_ids"].long(),
            pixel_values=t["pixel_values"],
            attention_mask=t["attention_mask"].long(),
            token_type_ids=t["token_type_ids"].long(),
        )
    return out.logits.float().numpy()


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image with structure at several scales, so resizing has something to do."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    coarse = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), channels), dtype=np.uint8)
    img = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse, mode).resize((width, height))
    fine = rng.integers(-40, 41, (height, width, channels))
    arr = np.clip(np.asarray(img, dtype=np.int32).reshape(height, width, channels) + fine, 0, 255).astype(np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims `width` x `height` pixels (a decompression bomb's shape).

    Its data is one pixel's: opening reads the claimed size, decoding fails. Enough to test that
    a size limit is applied from the header, without allocating the pixels.
    """
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    Path(path).write_bytes(bytes(data))
    return Path(path)


def run_without_torch(args: list[str], timeout: int = 300):
    """Run `python ARGS...` in a subprocess where `import torch` (and transformers) fails, as on the
    README's plain install (pip install mlx-paligemma), without uninstalling anything."""
    import subprocess
    import sys

    blocker = (
        "import sys, runpy\n"
        "class _Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'torchvision'):\n"
        "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Blocker())\n"
        "argv = sys.argv[1:]\n"
        "if argv[0] == '-m':\n"
        "    sys.argv = [argv[1]] + argv[2:]\n"
        "    runpy.run_module(argv[1], run_name='__main__', alter_sys=True)\n"
        "else:\n"
        "    sys.argv = argv\n"
        "    runpy.run_path(argv[0], run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True, timeout=timeout)
