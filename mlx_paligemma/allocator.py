"""glibc's malloc settings for MLX's CPU backend on Linux, set once when the package is imported.

MLX's CPU allocator takes every array from `malloc` and gives it back with `free` as soon as its last
consumer has run. glibc serves blocks above its mmap threshold (128 KB, adapting up to 32 MB) with fresh
`mmap` pages and returns freed heap memory above its trim threshold to the system, so a prefill's
megabyte-sized temporaries (activations, and the float32 weights `cpu_layers` dequantizes per product)
are page-faulted in and zeroed again layer after layer. Measured on the mid preset (2 cores, MKL): one
4-bit MLP over 260 tokens took 6,190 page faults and 52.5 ms, 0 faults and 39.9 ms with the settings
below; the float32 decoder's prefill 493 -> 305 ms and the 4-bit one 634 -> 474 ms
(`python -m benchmarks.bench_allocator`).

So blocks under `MMAP_THRESHOLD` come from the heap and up to `TRIM_THRESHOLD` of freed heap is kept for
the next allocation (at most that much more resident memory than glibc's defaults would keep; MLX's own
memory figures are unchanged). Larger blocks (a 3B model's embedding, loaded weights of big layers) are
still mapped and unmapped individually.

`MLX_PALIGEMMA_MALLOC=system` keeps glibc's defaults, and so does any malloc setting of the user's own
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or malloc tunables in `GLIBC_TUNABLES`). Other
platforms (macOS, musl) are untouched.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV_VAR = "MLX_PALIGEMMA_MALLOC"
MMAP_THRESHOLD = 64 * 2**20  # bytes: a block this size or larger gets its own mapping
TRIM_THRESHOLD = 256 * 2**20  # bytes of free memory at the heap's top kept instead of returned
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
_SETTINGS = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_state: dict = {"attempted": False, "applied": False, "reason": None}


def _user_chose() -> str | None:
    """Why glibc's settings are the user's to keep, or None."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("system", "off", "0", "false", "none"):
        return f"{ENV_VAR}={os.environ[ENV_VAR]}"
    for name in _USER_SETTINGS:
        if name in os.environ:
            return f"{name} is set"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    return None


def configure() -> bool:
    """Apply the thresholds once (glibc on Linux only); True when they are in effect. Never raises."""
    if _state["attempted"]:
        return _state["applied"]
    _state["attempted"] = True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        _state["reason"] = "not glibc"
        return False
    reason = _user_chose()
    if reason:
        _state["reason"] = reason
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
    except (OSError, AttributeError) as e:  # no libc symbol table: leave malloc as it is
        _state["reason"] = str(e)
        return False
    _state["applied"] = ok
    _state["reason"] = None if ok else "mallopt refused"
    return ok


def describe() -> str:
    """One line for `mlx-paligemma doctor`."""
    if _state["applied"]:
        mb = MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20
        return f"glibc: blocks under {mb[0]} MB from the heap, up to {mb[1]} MB of freed heap kept"
    return f"malloc: system defaults ({_state['reason'] or 'not configured'})"


configure()
