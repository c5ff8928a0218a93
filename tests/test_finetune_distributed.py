"""Data parallelism: two processes under `mlx.launch` (ring backend, this machine) end with the parameters
of one process trained on the combined batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_paligemma.load import load_model
from tests.test_finetune import _write_data

LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_two_processes_match_one_on_the_combined_batch(pg1_dir, tmp_path):
    data = _write_data(tmp_path / "data", n=8)
    runner = tmp_path / "run_finetune.py"
    runner.write_text("from mlx_paligemma.finetune import main\nraise SystemExit(main())\n")
    args = ["--model", str(pg1_dir), "--data", str(data), "--full", "--train-vision", "--batch-size", "4"]
    args += ["--max-steps", "3", "--lr", "1e-3", "--warmup", "1", "--seed", "3", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}

    single = subprocess.run(
        [sys.executable, str(runner), *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    launched = subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, str(runner), *args]
        + ["--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert launched.stdout.count("3 steps") == 1  # only rank 0 reports (and writes)

    one = dict(tree_flatten(load_model(tmp_path / "one", "float32").parameters()))
    two = dict(tree_flatten(load_model(tmp_path / "two", "float32").parameters()))
    initial = dict(tree_flatten(load_model(pg1_dir, "float32").parameters()))
    moved = 0
    for k, v in one.items():
        np.testing.assert_allclose(np.array(two[k]), np.array(v), rtol=0, atol=2e-5, err_msg=k)
        moved += not np.allclose(np.array(v), np.array(initial[k]))
    assert moved > len(one) // 2  # the comparison is about trained parameters, not the initial ones
