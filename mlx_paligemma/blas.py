"""A fast BLAS for MLX's CPU backend on Linux, loaded before `mlx.core`.

The `mlx[cpu]` wheel links the reference BLAS it bundles (~3 GFLOP/s on a matmul); MLX resolves
`cblas_sgemm` and friends when `mlx.core` is imported, so a faster library loaded with
RTLD_GLOBAL *before* that import takes over every matmul (~100x on this kind of machine).
Loaded after it, nothing changes: the bindings are already made. `mlx_paligemma/__init__.py`
imports this module first thing and importing it preloads, so `import mlx_paligemma`, the CLIs
and the benchmarks all get it.

Order tried: Intel MKL's `libmkl_rt` from this environment's `lib/` (the `mkl` wheel, a
dependency on Linux x86_64), then the system's OpenBLAS. `MLX_PALIGEMMA_BLAS` chooses:
`off` (keep the bundled one), `mkl`, `openblas`, or a path to a shared library. macOS is
untouched (MLX uses Accelerate and the GPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import warnings
from typing import Optional

ENV_VAR = "MLX_PALIGEMMA_BLAS"
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
# What a mapped library's file name says about which BLAS it is.
_KINDS = (("libmkl_rt", "mkl"), ("libopenblas", "openblas"), ("libblas", "reference"))

_state: dict = {"attempted": False, "requested": None, "loaded": None, "too_late": False, "error": None}


def _mkl_candidates() -> list[str]:
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX") or sys.prefix])
    found: list[str] = []
    for prefix in prefixes:
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), key=len)
    return found


def _openblas_candidates() -> list[str]:
    found = [p for p in OPENBLAS_PATHS if os.path.exists(p)]
    name = ctypes.util.find_library("openblas")
    return found + ([name] if name else [])


def _candidates(choice: str) -> list[str]:
    if choice == "mkl":
        return _mkl_candidates()
    if choice == "openblas":
        return _openblas_candidates()
    if choice in ("", "auto"):
        return _mkl_candidates() + _openblas_candidates()
    return [choice]  # a path


def _mlx_imported() -> bool:
    return "mlx.core" in sys.modules


def preload() -> Optional[str]:
    """Load the fastest BLAS available with RTLD_GLOBAL, once; return its path (None: none loaded).

    Never raises: a missing or unloadable library leaves MLX on its bundled BLAS, which is slow
    but correct. If `mlx.core` is already imported it is too late; this warns once.
    """
    if _state["attempted"]:
        return _state["loaded"]
    _state["attempted"] = True
    choice = os.environ.get(ENV_VAR, "auto").strip()
    _state["requested"] = choice or "auto"
    if sys.platform != "linux" or choice.lower() in ("off", "0", "none", "false"):
        return None
    choice = choice if os.sep in choice else choice.lower()
    if _mlx_imported():
        _state["too_late"] = True
        warnings.warn(
            "mlx.core was imported before mlx_paligemma, so MLX keeps the slow BLAS bundled with its CPU wheel; "
            "import mlx_paligemma first (or preload libmkl_rt with LD_PRELOAD) for fast CPU matmuls",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    # MKL keeps its default threading layer (Intel OpenMP, from the intel-openmp wheel). Measured on a busy
    # 2-core machine (mid preset decode): INTEL 4.0 tok/s, SEQUENTIAL 3.5, GNU 0.7-1.7 (GNU OpenMP's spinning
    # threads starve when the cores are shared); torch keeps working beside it in either import order
    # (tests/test_blas.py). MKL_THREADING_LAYER, if the user sets it, is left alone.
    for path in _candidates(choice):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            _state["error"] = f"{path}: {error}"
            continue
        _state["loaded"] = path
        return path
    return None


def _mapped_blas_libraries() -> list[str]:
    """Paths of the BLAS-like shared libraries mapped into this process (Linux /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if any(key in os.path.basename(p) for key, _ in _KINDS))


def _kind(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    name = os.path.basename(path)
    return next((kind for key, kind in _KINDS if key in name), "other")


def blas_report() -> dict:
    """Which BLAS MLX's CPU matmuls use and why, for the doctor and the tests.

    `mlx_blas`: "accelerate" (macOS), "mkl" / "openblas" / another preloaded library, or
    "reference" (the slow one bundled with the mlx[cpu] wheel). `too_late`: mlx.core was
    imported before this package could preload. `mapped`: BLAS libraries in the process.
    """
    if sys.platform == "darwin":
        mlx_blas = "accelerate"
    elif _state["loaded"]:
        mlx_blas = _kind(_state["loaded"])
    elif any(_kind(p) in ("mkl", "openblas") for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()):
        mlx_blas = next(_kind(p) for p in os.environ["LD_PRELOAD"].replace(":", " ").split() if _kind(p) != "other")
    else:
        mlx_blas = "reference"
    return {
        "platform": sys.platform,
        "requested": _state["requested"] or os.environ.get(ENV_VAR, "auto"),
        "preloaded": _state["loaded"],
        "mlx_blas": mlx_blas,
        "too_late": _state["too_late"],
        "error": _state["error"],
        "mkl_threading_layer": os.environ.get("MKL_THREADING_LAYER"),
        "mapped": _mapped_blas_libraries(),
    }


preload()  # on import: `mlx_paligemma/__init__.py` imports this module before anything imports mlx.core
