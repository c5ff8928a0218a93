"""The package's glibc malloc settings (mlx_paligemma/allocator.py): in effect after `import mlx_paligemma`
on glibc, left alone when the user chose, and what they are for: a temporary MLX frees and allocates again
is not page-faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings (Linux only)"
)

# A 40 MB temporary made and freed ten times: glibc's defaults map every block above 32 MB (its largest
# adaptive threshold) afresh, 10,240 pages each time; kept in the heap it faults nothing after the first.
SCRIPT = """
import resource
import mlx_paligemma
import mlx.core as mx
from mlx_paligemma import allocator
a = mx.random.normal((10 * 2**20,))
mx.eval(a)
step = lambda: mx.eval((a * 2 + 1).sum())
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(allocator._state["applied"], (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _run(**env: str) -> tuple[bool, float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MLX_PALIGEMMA_MALLOC"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**base, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


def test_freed_temporaries_are_not_faulted_in_again():
    applied, faults = _run()
    assert applied
    assert faults < 500, faults  # measured 0
    applied, faults = _run(MLX_PALIGEMMA_MALLOC="system")
    assert not applied
    assert faults > 5000, faults  # measured 10,241: the 40 MB block mapped anew every time


USERS_OWN = [{"MALLOC_MMAP_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}]


@pytest.mark.parametrize("env", USERS_OWN)
def test_a_users_own_malloc_settings_are_kept(env):
    applied, _ = _run(**env)
    assert not applied


def test_doctor_names_the_setting():
    from mlx_paligemma import allocator
    from mlx_paligemma.doctor import mlx_info

    assert mlx_info()["malloc"] == allocator.describe()
    assert ("from the heap" in allocator.describe()) == allocator._state["applied"]
