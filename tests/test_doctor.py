"""`mlx-paligemma doctor`, the backend doctor, run as a user runs it (with and without torch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mlx_paligemma import doctor
from tests.helpers import run_without_torch

SHIM = Path(__file__).resolve().parents[1] / "tools" / "check_backend.py"


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_paligemma", "doctor", *args], capture_output=True, text=True, timeout=300
    )


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
    demo = [line for line in out.stdout.splitlines() if line.startswith("mlx (") and "demo model forward" in line]
    assert len(demo) == 1 and " PASS " in demo[0]
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


def test_the_demo_models_stored_reference_is_the_torch_backends_output_now(tmp_path):
    """forward_check.json holds what the PyTorch reference computes for the shipped weights (rewritten
    in a copy and compared), and a wrong stored logit fails the check."""
    demo = Path(doctor.__file__).parent / "demo"
    copy = tmp_path / "demo"
    shutil.copytree(demo, copy)
    doctor.write_demo_reference(copy)
    stored = json.loads((demo / doctor.DEMO_REFERENCE).read_text())
    fresh = json.loads((copy / doctor.DEMO_REFERENCE).read_text())
    stored_logits, fresh_logits = np.array(stored["logits"]), np.array(fresh["logits"])
    # torch's float32 kernels differ by CPU: 1.3e-5 (logits up to 17.9) on another Xeon than the one that
    # wrote the file; so 1e-5 of the largest |logit|, ten times tighter than the check's own tolerance.
    assert np.abs(stored_logits - fresh_logits).max() <= 1e-5 * np.abs(stored_logits).max()
    assert doctor.demo_forward_check("mlx (cpu)", "cpu", copy).status == "PASS"
    fresh["logits"][-1][0] += 1.0
    (copy / doctor.DEMO_REFERENCE).write_text(json.dumps(fresh))
    failed = doctor.demo_forward_check("mlx (cpu)", "cpu", copy)
    assert failed.status == "FAIL" and "normalised max diff" in failed.detail


def test_doctor_exits_1_when_a_check_fails(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "TOL_FP32", {"cpu": 0.0, "gpu": 0.0})  # no float32 matmul is that exact
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert " FAIL " in out and out.rstrip().splitlines()[-1].startswith("FAIL")


def test_bf16_cast_is_skipped_where_the_reference_falls_back_to_float16(monkeypatch):
    """A Mac before macOS 14 has no bf16 on MPS: reported as SKIP, which does not fail the doctor."""
    from mlx_paligemma.reference import device

    monkeypatch.setattr(device, "supports_bf16", lambda _device: False)
    results = {r.check: r for r in doctor.op_checks(doctor.TorchBackend("cpu"))}
    assert results["cast bfloat16"].status == "SKIP"
    assert results["cast float16"].status == "PASS"


def test_without_torch_the_doctor_runs_the_mlx_checks_and_says_torch_is_missing():
    out = run_without_torch(["-m", "mlx_paligemma", "doctor", "--json"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["environment"]["torch"].startswith("not installed")
    mlx = [c for c in report["checks"] if c["backend"].startswith("mlx")]
    assert {c["check"] for c in mlx} >= {"matmul", "sdpa", "rms_norm"} and all(c["status"] != "FAIL" for c in mlx)
    forward = [c for c in mlx if "forward" in c["check"]]
    assert [(c["check"], c["status"]) for c in forward] == [("demo model forward", "PASS")], forward
    assert "vs stored PyTorch logits" in forward[0]["detail"]
    assert not any(c["backend"].startswith("torch") for c in report["checks"])
    assert out.stderr == ""


def test_the_old_doctor_path_still_works():
    out = subprocess.run([sys.executable, str(SHIM), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "mlx-paligemma doctor" in out.stdout
