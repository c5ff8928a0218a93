"""tools/check_backend.py, the backend doctor, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

DOCTOR = Path(__file__).resolve().parents[1] / "tools" / "check_backend.py"


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCTOR), *args], capture_output=True, text=True, timeout=300)


def expected_backends() -> list[str]:
    names = ["torch cpu"]
    if torch.backends.mps.is_available():
        names.append("torch mps")
    if torch.cuda.is_available():
        names.append("torch cuda")
    return names


def test_doctor_passes_on_every_available_backend():
    out = run_doctor()
    assert out.returncode == 0, out.stdout + out.stderr
    for backend in ["mlx ("] + expected_backends():
        lines = [line for line in out.stdout.splitlines() if line.startswith(backend)]
        assert lines and all(" PASS " in line or " SKIP " in line for line in lines), backend
        assert any("tiny PaliGemma 1 forward" in line for line in lines)
    assert "FAIL" not in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("PASS")


def test_doctor_json_lists_the_environment_and_every_check():
    out = run_doctor("--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {"platform", "python", "mlx", "torch", "MPS", "CUDA"} <= report["environment"].keys()
    checks = {(c["backend"], c["check"]) for c in report["checks"]}
    for backend in expected_backends():
        assert (backend, "sdpa") in checks and (backend, "tiny PaliGemma 2 forward") in checks
    assert all(c["status"] in ("PASS", "SKIP") for c in report["checks"])
