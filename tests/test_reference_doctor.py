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


def load_doctor():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_backend", DOCTOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_doctor_exits_1_when_a_check_fails(monkeypatch, capsys):
    doctor = load_doctor()
    monkeypatch.setattr(doctor, "TOL_FP32", {"cpu": 0.0, "gpu": 0.0})  # no float32 matmul is that exact
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert " FAIL " in out and out.rstrip().splitlines()[-1].startswith("FAIL")


def test_bf16_cast_is_skipped_where_the_reference_falls_back_to_float16(monkeypatch):
    """A Mac before macOS 14 has no bf16 on MPS: reported as SKIP, which does not fail the doctor."""
    from mlx_paligemma.reference import device

    doctor = load_doctor()
    monkeypatch.setattr(device, "supports_bf16", lambda _device: False)
    results = {r.check: r for r in doctor.op_checks(doctor.TorchBackend("cpu"))}
    assert results["cast bfloat16"].status == "SKIP"
    assert results["cast float16"].status == "PASS"
