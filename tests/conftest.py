"""Shared fixtures: tiny random checkpoints built by our own tool, images, the transformers oracle."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def pg1_dir(tmp_path_factory) -> Path:
    """PaliGemma 1: sparse hub config (head_dim omitted -> 256), hub key layout, two shards."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pg1", version=1, layout="hub",
                                shards=2, sparse_config=True)


@pytest.fixture(scope="session")
def pg2_dir(tmp_path_factory) -> Path:
    """PaliGemma 2: transformers-5 key layout and config, sliding window 8 (< every test sequence)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pg2", version=2, layout="transformers",
                                sliding_window=8)


@pytest.fixture(scope="session", params=["pg1", "pg2"])
def ckpt_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


@functools.lru_cache(maxsize=None)
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
        out = model(input_ids=t["input_ids"].long(), pixel_values=t["pixel_values"],
                    attention_mask=t["attention_mask"].long(), token_type_ids=t["token_type_ids"].long())
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
