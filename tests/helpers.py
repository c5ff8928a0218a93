"""Shared test helpers: the transformers oracle and synthetic images (fixtures live in conftest.py)."""

from __future__ import annotations

import functools
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
