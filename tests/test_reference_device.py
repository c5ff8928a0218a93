"""Device and dtype choice of the reference backend, with MPS / CUDA availability faked.

The decisions are pure functions of availability, so a Linux CI checks what a Mac user gets;
only the tests that need a real MPS device are skipped elsewhere.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mlx_paligemma import reference
from mlx_paligemma.errors import PaliGemmaError
from mlx_paligemma.reference import device as dev
from mlx_paligemma.reference.env import apply_mps_env, low_watermark_for

MPS = torch.device("mps")
CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")
needs_mps = pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple MPS")


# -- device ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mps, cuda_count, expected", [(True, 1, MPS), (True, 0, MPS), (False, 2, CUDA0), (False, 0, CPU)]
)
def test_automatic_choice_prefers_mps_then_cuda_then_cpu(mps, cuda_count, expected):
    assert dev.choose_device(None, mps=mps, cuda_count=cuda_count) == expected


@pytest.mark.parametrize(
    "requested, expected",
    [("cpu", CPU), ("mps", MPS), ("cuda", CUDA0), ("cuda:1", torch.device("cuda", 1)), (CPU, CPU)],
)
def test_requested_device_wins_when_available(requested, expected):
    assert dev.choose_device(requested, mps=True, cuda_count=2) == expected


@pytest.mark.parametrize(
    "requested, message",
    [
        ("mps", "device 'mps' requested but"),
        ("cuda", "no CUDA device"),
        ("cuda:1", "1 CUDA device"),
        ("tpu", "not a device name|unsupported type"),
        ("xla", "not a device name|unsupported type"),
    ],
)
def test_unavailable_or_unknown_device_is_a_clear_error(requested, message):
    cuda_count = 1 if requested == "cuda:1" else 0
    with pytest.raises(PaliGemmaError, match=message):
        dev.choose_device(requested, mps=False, cuda_count=cuda_count)


def test_availability_is_read_through_patchable_functions(monkeypatch):
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    assert dev.choose_device() == MPS
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    monkeypatch.setattr(dev, "cuda_device_count", lambda: 1)
    assert dev.choose_device() == CUDA0


def test_load_on_missing_mps_raises_before_reading_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    with pytest.raises(PaliGemmaError, match="'mps' requested"):
        reference.load_model(tmp_path, device="mps")


# -- dtype -------------------------------------------------------------------------------------
def test_bfloat16_on_mps_before_macos_14_falls_back_to_float16_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    monkeypatch.setattr(dev, "macos_version", lambda: (13, 6))
    with caplog.at_level(logging.WARNING, logger=dev.__name__):
        assert dev.choose_dtype(torch.bfloat16, MPS) == torch.float16
    assert "macOS 14" in caplog.text and "float16" in caplog.text


def test_bfloat16_is_kept_on_macos_14(monkeypatch, caplog):
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    monkeypatch.setattr(dev, "macos_version", lambda: (14, 0))
    with caplog.at_level(logging.WARNING):
        assert dev.choose_dtype(torch.bfloat16, MPS) == torch.bfloat16
    assert caplog.text == ""


def test_float64_never_reaches_mps(caplog):
    with caplog.at_level(logging.WARNING, logger=dev.__name__):
        assert dev.choose_dtype(torch.float64, MPS) == torch.float32
    assert "float64" in caplog.text
    pixels = dev.host_tensor(np.zeros((1, 3, 4, 4), np.float64), MPS)
    assert pixels.dtype == torch.float32


def test_bfloat16_on_old_cuda_falls_back_to_float16(caplog):
    with caplog.at_level(logging.WARNING, logger=dev.__name__):
        assert dev.choose_dtype(torch.bfloat16, CUDA0, bf16=False) == torch.float16
    assert "compute capability" in caplog.text
    assert dev.choose_dtype(torch.bfloat16, CUDA0, bf16=True) == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cpu_keeps_every_dtype_silently(dtype, caplog):
    with caplog.at_level(logging.WARNING):
        assert dev.choose_dtype(dtype, CPU) == dtype
    assert caplog.text == ""


def test_dtype_names_are_those_of_the_mlx_backend_plus_float64():
    assert dev.parse_dtype("bfloat16") == torch.bfloat16 and dev.parse_dtype(None) is None
    assert dev.parse_dtype("float64") == torch.float64
    with pytest.raises(PaliGemmaError, match="unsupported 'int8'"):
        dev.parse_dtype("int8")


def test_host_tensor_makes_integers_int64_and_keeps_float32():
    assert dev.host_tensor(np.arange(3, dtype=np.int32), CPU).dtype == torch.int64
    assert dev.host_tensor(np.zeros(3, np.float32), MPS).dtype == torch.float32
    assert dev.host_tensor(np.zeros(3, np.float64), CPU).dtype == torch.float64


# -- environment ---------------------------------------------------------------------------------
def test_env_defaults_fill_only_unset_variables():
    environ = {"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.0"}
    applied = apply_mps_env(environ)
    assert environ["PYTORCH_MPS_HIGH_WATERMARK_RATIO"] == "0.0", "a user value must win"
    assert applied == {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}


def test_env_defaults_on_an_empty_environment():
    environ: dict[str, str] = {}
    apply_mps_env(environ)
    assert environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert environ["PYTORCH_MPS_HIGH_WATERMARK_RATIO"] == "0.7"
    # torch rejects low > high, and its default low is 1.4: a low ratio must come with 0.7.
    assert float(environ["PYTORCH_MPS_LOW_WATERMARK_RATIO"]) <= 0.7


def test_low_watermark_is_only_set_when_torch_would_reject_its_default():
    assert low_watermark_for("1.7") is None and low_watermark_for("0") is None
    assert 0 < float(low_watermark_for("0.5")) <= 0.5
    assert apply_mps_env({"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.5", "PYTORCH_MPS_LOW_WATERMARK_RATIO": "0.1"}) == {
        "PYTORCH_ENABLE_MPS_FALLBACK": "1"
    }


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)


def test_import_sets_the_variables_in_a_fresh_process():
    out = run_python(
        "import os, mlx_paligemma.reference; "
        "print(os.environ['PYTORCH_ENABLE_MPS_FALLBACK'], os.environ['PYTORCH_MPS_HIGH_WATERMARK_RATIO'])"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0.7"]


def test_import_keeps_user_values():
    out = run_python(
        "import os, mlx_paligemma.reference; print(os.environ['PYTORCH_ENABLE_MPS_FALLBACK'], "
        "os.environ['PYTORCH_MPS_HIGH_WATERMARK_RATIO'])",
        PYTORCH_ENABLE_MPS_FALLBACK="0",
        PYTORCH_MPS_HIGH_WATERMARK_RATIO="1.2",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1.2"]


TORCH_IMPORT_PROBE = """
import importlib.abc, os, sys
seen = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen["fallback"] = os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK")
        return None
sys.meta_path.insert(0, Probe())
import mlx_paligemma.reference as r
print(seen["fallback"] == "1", r.env.TORCH_WAS_IMPORTED_FIRST)
"""


def test_torch_sees_the_variables_or_the_package_knows_it_was_too_late():
    """Never silently ineffective: if something imported torch before the reference package could
    set the variables (a user's own `import torch`), the package records it, warns when an MPS model
    is loaded, and the doctor shows it. `import mlx_paligemma` itself imports neither torch nor
    transformers (mlx-lm used to), so here the variables arrive in time."""
    out = run_python(TORCH_IMPORT_PROBE)
    assert out.returncode == 0, out.stderr
    saw_env, too_late = (word == "True" for word in out.stdout.split())
    assert saw_env and not too_late


def test_loading_on_mps_warns_when_the_fallback_came_too_late(monkeypatch, caplog):
    monkeypatch.setattr(reference.env, "TORCH_WAS_IMPORTED_FIRST", True)
    monkeypatch.setattr(reference.env, "APPLIED", {"PYTORCH_ENABLE_MPS_FALLBACK": "1"})
    with caplog.at_level(logging.WARNING, logger=dev.__name__):
        dev.warn_if_env_too_late(CPU)
        assert caplog.text == ""
        dev.warn_if_env_too_late(MPS)
    assert "export PYTORCH_ENABLE_MPS_FALLBACK=1" in caplog.text


def test_import_prints_nothing():
    out = run_python("import mlx_paligemma.reference")
    assert out.returncode == 0
    assert out.stdout == "" and out.stderr == ""


# -- a real Mac ----------------------------------------------------------------------------------
@needs_mps
def test_mps_is_the_automatic_choice_on_a_mac():
    assert reference.choose_device() == MPS


@needs_mps
def test_mps_forward_matches_cpu(tmp_path_factory):
    from tests.test_reference_logits import max_diff, noise_image, tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path_factory, "pg2")
    cpu_model, processor = reference.load(ckpt, device="cpu", dtype="float32")
    mps_model, mps_processor = reference.load(ckpt, device="mps", dtype="float32")
    image = noise_image(50, 60)
    batch = mps_processor(images=[image], prompts=["caption en"], suffixes=["a cat"])
    assert batch["input_ids"].device.type == "mps"
    got = mps_model(**batch).cpu()
    assert max_diff(got, cpu_model(**processor(images=[image], prompts=["caption en"], suffixes=["a cat"]))) <= 1e-3
