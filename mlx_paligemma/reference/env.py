"""PyTorch MPS environment defaults, applied before this package imports torch.

Kept free of any torch import on purpose: torch reads these variables from the process
environment, `PYTORCH_ENABLE_MPS_FALLBACK` once when it is imported (it registers the CPU
fallback for MPS ops at library load) and the watermark ratios once when the MPS allocator
starts (the first tensor on "mps"). Setting them later changes nothing, which is why
`mlx_paligemma.reference` applies them first thing and records whether it was too late.

Values the user exported always win (`os.environ.setdefault`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

#: Unsupported MPS ops run on the CPU instead of raising NotImplementedError (slower, but a
#: reference run finishes); a hard allocation limit at 70% of the GPU's recommended working
#: set, so a model too big for the Mac fails with an out-of-memory error instead of swapping
#: the whole machine to a halt (torch's default 1.7 allows 170%).
MPS_ENV_DEFAULTS = {
    "PYTORCH_ENABLE_MPS_FALLBACK": "1",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.7",
}
LOW_WATERMARK = "PYTORCH_MPS_LOW_WATERMARK_RATIO"
#: torch's own defaults on unified memory (Apple silicon): low 1.4 of high 1.7.
TORCH_DEFAULT_LOW_WATERMARK = 1.4
LOW_OVER_HIGH = 1.4 / 1.7


def low_watermark_for(high: str) -> str | None:
    """A low watermark that torch accepts with this high one, or None if its default is fine.

    torch requires low <= high and its unified-memory default low is 1.4, so exporting only
    `PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.7` makes the first MPS allocation fail with
    "invalid low watermark ratio 1.4". Keep torch's low/high proportion instead.
    """
    try:
        value = float(high)
    except ValueError:
        return None  # torch reports a malformed value better than we can
    if value == 0.0 or value >= TORCH_DEFAULT_LOW_WATERMARK:
        return None  # 0 disables the limit: torch then allows low up to 2.0
    return f"{value * LOW_OVER_HIGH:.2f}"


def apply_mps_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the MPS defaults that are not already set; return what was set."""
    applied = {}
    for key, value in MPS_ENV_DEFAULTS.items():
        if key not in environ:
            environ[key] = applied[key] = value
    if LOW_WATERMARK not in environ:
        low = low_watermark_for(environ["PYTORCH_MPS_HIGH_WATERMARK_RATIO"])
        if low is not None:
            environ[LOW_WATERMARK] = applied[LOW_WATERMARK] = low
    return applied


#: What `mlx_paligemma.reference` set, and whether torch had been imported before it could
#: (then the fallback is not in effect: export the variable in the shell instead).
APPLIED: dict[str, str] = {}
TORCH_WAS_IMPORTED_FIRST = False


def apply_at_import() -> None:
    global APPLIED, TORCH_WAS_IMPORTED_FIRST
    TORCH_WAS_IMPORTED_FIRST = "torch" in sys.modules
    APPLIED = apply_mps_env()
