"""Shared fixtures: tiny random checkpoints built by our own tool (helpers are in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlx_paligemma  # noqa: F401  first, before any test module imports mlx.core: MLX gets the fast BLAS
from tools.make_tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def pg1_dir(tmp_path_factory) -> Path:
    """PaliGemma 1: sparse hub config (head_dim omitted -> 256), hub key layout, two shards."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "pg1", version=1, layout="hub", shards=2, sparse_config=True
    )


@pytest.fixture(scope="session")
def pg2_dir(tmp_path_factory) -> Path:
    """PaliGemma 2: transformers-5 key layout and config, sliding window 8 (< every test sequence)."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "pg2", version=2, layout="transformers", sliding_window=8
    )


@pytest.fixture(scope="session", params=["pg1", "pg2"])
def ckpt_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")
