"""The fast CPU path is really taken: `import mlx_paligemma` preloads MKL (or OpenBLAS) before mlx.core.

Each case runs in a fresh interpreter, since the BLAS MLX binds is fixed when mlx.core is first
imported. The numbers stay the reference's: logits with MKL match transformers within the usual 1e-4.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import hf_logits, noise_image

LINUX = sys.platform == "linux"
HAS_MKL = (
    LINUX
    and platform.machine() == "x86_64"
    and any(name.startswith("libmkl_rt.so") for name in os.listdir(os.path.join(sys.prefix, "lib")))
)
needs_mkl = pytest.mark.skipif(not HAS_MKL, reason="the mkl wheel is a dependency on Linux x86_64 only")


def run_python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLX_PALIGEMMA_BLAS", "LD_PRELOAD")}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


REPORT = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    {imports}
from mlx_paligemma.blas import blas_report
print(json.dumps(dict(blas_report(), warnings=[str(w.message) for w in caught])))
"""


@needs_mkl
def test_import_preloads_mkl():
    r = run_python(REPORT.format(imports="import mlx_paligemma"))
    assert r["mlx_blas"] == "mkl" and "libmkl_rt" in r["preloaded"]
    assert any("libmkl_rt" in path for path in r["mapped"])
    assert not r["too_late"] and r["warnings"] == []


@pytest.mark.skipif(not LINUX, reason="macOS keeps Accelerate")
def test_env_var_turns_it_off():
    r = run_python(REPORT.format(imports="import mlx_paligemma"), MLX_PALIGEMMA_BLAS="off")
    assert r["mlx_blas"] == "reference" and r["preloaded"] is None
    assert not any("libmkl_rt" in path or "libopenblas" in path for path in r["mapped"])


@pytest.mark.skipif(not LINUX, reason="macOS keeps Accelerate")
def test_env_var_names_a_library():
    r = run_python(REPORT.format(imports="import mlx_paligemma"), MLX_PALIGEMMA_BLAS="/nonexistent/libfoo.so")
    assert r["preloaded"] is None and r["mlx_blas"] == "reference"
    assert "/nonexistent/libfoo.so" in r["error"]


@pytest.mark.skipif(not LINUX, reason="macOS keeps Accelerate")
def test_mlx_imported_first_warns_once():
    r = run_python(REPORT.format(imports="import mlx.core\n    import mlx_paligemma\n    import mlx_paligemma.blas"))
    assert r["too_late"] and r["mlx_blas"] == "reference" and r["preloaded"] is None
    assert len(r["warnings"]) == 1 and "import mlx_paligemma first" in r["warnings"][0]


TORCH_TOO = """
import json
import numpy as np
{first}
{second}
import mlx.core as mx
from mlx_paligemma.blas import blas_report
rng = np.random.default_rng(0)
a, b = rng.standard_normal((300, 200), dtype=np.float32), rng.standard_normal((200, 100), dtype=np.float32)
want = a.astype(np.float64) @ b
err_torch = float(np.abs(torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy() - want).max())
err_mlx = float(np.abs(np.asarray(mx.array(a) @ mx.array(b)) - want).max())
print(json.dumps(dict(blas=blas_report()["mlx_blas"], err_torch=err_torch, err_mlx=err_mlx)))
"""


@needs_mkl
@pytest.mark.parametrize("order", ["package_first", "torch_first"])
def test_torch_works_beside_it(order):
    """MKL's GNU threading layer beside torch's own MKL and OpenMP, in either import order."""
    imports = ["import mlx_paligemma", "import torch"]
    first, second = imports if order == "package_first" else imports[::-1]
    r = run_python(TORCH_TOO.format(first=first, second=second))
    assert r["blas"] == "mkl"
    assert r["err_torch"] < 1e-3 and r["err_mlx"] < 1e-3


LOGITS = """
import json, sys
import numpy as np
import mlx_paligemma as mp
from mlx_paligemma.blas import blas_report
batch = {{k: np.asarray(v) for k, v in np.load(sys.argv[1]).items()}}
model, _ = mp.load({ckpt!r})
out = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"])
np.save(sys.argv[2], np.asarray(out))
print(json.dumps(dict(blas=blas_report()["mlx_blas"])))
"""


@needs_mkl
def test_logits_with_mkl_match_transformers(pg2_dir, tmp_path):
    import mlx_paligemma as mp

    _, processor = mp.load(pg2_dir)
    batch = {k: np.asarray(v) for k, v in processor(images=[noise_image(80, 60)], prompts=["caption en"]).items()}
    np.savez(tmp_path / "batch.npz", **batch)
    code = LOGITS.format(ckpt=str(pg2_dir))
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "batch.npz"), str(tmp_path / "logits.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["blas"] == "mkl"
    ours, ref = np.load(tmp_path / "logits.npy"), hf_logits(pg2_dir, batch)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4
