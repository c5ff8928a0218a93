"""The README's plain install (no torch, no transformers): the MLX path works, the rest says what to install.

Simulated with an import blocker in a fresh interpreter (tests.helpers.run_without_torch).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import noise_image, run_without_torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    noise_image(50, 40, seed=2).save(path)
    return path


def assert_install_hint(out) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "pip install torch" in lines[0]


def test_mlx_generation_needs_neither_torch_nor_transformers(pg1_dir, image_path):
    args = ["-m", "mlx_paligemma", "generate", "--model", str(pg1_dir), "--image", str(image_path)]
    out = run_without_torch([*args, "--prompt", "caption en", "--max-tokens", "4"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and out.stderr == ""


def test_the_demo_command_needs_neither_torch_nor_transformers(tmp_path):
    out = run_without_torch(["-m", "mlx_paligemma", "demo", "--out", str(tmp_path / "demo.png")])
    assert out.returncode == 0, out.stderr
    assert "caption en" in out.stdout and (tmp_path / "demo.png").is_file()


def test_the_torch_backend_says_what_to_install(pg1_dir, image_path):
    args = ["-m", "mlx_paligemma.generate", "--model", str(pg1_dir), "--image", str(image_path)]
    assert_install_hint(run_without_torch([*args, "--prompt", "caption en", "--backend", "torch"]))


def test_the_tiny_checkpoint_tool_says_what_to_install(tmp_path):
    out = run_without_torch([str(ROOT / "tools" / "make_tiny_checkpoint.py"), str(tmp_path / "tiny")])
    assert_install_hint(out)
    assert not (tmp_path / "tiny").exists()
