"""The shipped demo model: it loads by name on both backends, offline, and really does the shapes task."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_paligemma as mp
from benchmarks.eval_shapes import evaluate
from mlx_paligemma.checkpoint import resolve_model_dir

DEMO = Path(mp.__file__).parent / "demo"
EXAMPLES = DEMO / "examples"

# Levels measured on 50 held-out scenes (benchmarks/eval_shapes.py, its fixed seed) when the model
# was shipped, minus a margin for the few answers that differ between backends and kernels.
# The measured values and the learning curve are in mlx_paligemma/demo/README.md.
# Measured (both backends alike): caption 32%, counting 96%, colour 79%, detection mIoU 0.339, recall@0.5 40%.
FLOORS = {
    "caption_exact": 0.22,
    "counting": 0.88,
    "colour": 0.68,
    "detection_miou": 0.28,
    "detection_recall50": 0.30,
}


def test_demo_files_ship_in_the_package():
    assert (DEMO / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    for name in ("config.json", "tokenizer.model", "preprocessor_config.json", "README.md"):
        assert (DEMO / name).is_file(), name
    assert len(list(EXAMPLES.glob("*.png"))) >= 2
    assert resolve_model_dir("demo") == DEMO


def test_a_local_directory_named_demo_wins(pg1_dir, tmp_path, monkeypatch):
    shutil.copytree(pg1_dir, tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    model, _ = mp.load("demo")
    assert model.config.text_config.hidden_size == 64  # the tiny checkpoint, not the shipped model


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_demo_model_reaches_its_measured_levels(backend):
    if backend == "torch":
        from mlx_paligemma.reference import load as load_torch

        model, processor = load_torch("demo", device="cpu", dtype="float32")
    else:
        model, processor = mp.load("demo")
    metrics = evaluate(model, processor, n_images=50)
    for key, floor in FLOORS.items():
        assert metrics[key] >= floor, (key, metrics[key], floor)


def test_generate_cli_defaults_to_the_demo_model():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_paligemma.generate", "--image", str(EXAMPLES / "shapes1.png")]
        + ["--prompt", "caption en", "--no-stream"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    notice = [line for line in out.stderr.splitlines() if "demo model" in line]
    assert len(notice) == 1 and "--model" in notice[0]
    assert out.stdout.strip()
