"""Device and dtype choice for the PyTorch backend, as a Mac user expects of an MPS port.

Automatic choice is MPS > CUDA > CPU. The decisions are pure functions of what is available;
availability is read through the small functions at the top so tests can fake a Mac or a
CUDA box. A requested device that is not there is an error, never a silent CPU run.
"""

from __future__ import annotations

import logging
import platform
from typing import Any, Optional, Union

import numpy as np
import torch

from ..dtypes import SAFETENSORS_CODES, torch_dtypes
from ..errors import PaliGemmaError
from . import env

logger = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device, None]
DTYPES = torch_dtypes()
#: safetensors dtype codes of floating tensors.
SAFETENSORS_DTYPES = {code: DTYPES[name] for code, name in SAFETENSORS_CODES.items()}


# -- what this machine has (monkeypatched in tests) ------------------------------------------
def mps_built() -> bool:
    return torch.backends.mps.is_built()


def mps_available() -> bool:
    return torch.backends.mps.is_available()


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def macos_version() -> Optional[tuple[int, int]]:
    """(major, minor) of macOS, None elsewhere."""
    release = platform.mac_ver()[0]
    if not release:
        return None
    parts = [int(p) for p in release.split(".")[:2] if p.isdigit()]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def mps_supports_bf16() -> bool:
    """bfloat16 kernels on MPS need macOS 14 (Sonoma); older systems raise at the first op."""
    if mps_available():
        return torch.backends.mps.is_macos_or_newer(14, 0)
    version = macos_version()
    return version is not None and version >= (14, 0)


def cuda_supports_bf16(index: int) -> bool:
    """Native bf16 needs compute capability 8 (Ampere); older GPUs only emulate it, slowly."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(index).major >= 8


# -- decisions --------------------------------------------------------------------------------
def choose_device(
    requested: DeviceLike = None, *, mps: Optional[bool] = None, cuda_count: Optional[int] = None
) -> torch.device:
    """`requested` ("mps", "cuda", "cuda:1", "cpu", a torch.device) or the best available one."""
    mps = mps_available() if mps is None else mps
    cuda_count = cuda_device_count() if cuda_count is None else cuda_count
    if requested is None:
        if mps:
            return torch.device("mps")
        return torch.device("cuda", 0) if cuda_count else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise PaliGemmaError(
            f"device {requested!r}: not a device name (use 'mps', 'cuda', 'cuda:N' or 'cpu')"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "mps":
        if not mps:
            raise PaliGemmaError(
                f"device 'mps' requested but {_why_no_mps()}; choose the cpu device "
                f"(or leave the device unset to choose automatically)"
            )
        return torch.device("mps")
    if device.type == "cuda":
        index = device.index or 0
        if index >= cuda_count:
            have = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device (or a CPU-only torch)"
            raise PaliGemmaError(
                f"device {str(requested)!r} requested but this machine has {have}; choose the cpu device "
                f"or leave the device unset"
            )
        return torch.device("cuda", index)
    raise PaliGemmaError(
        f"device {str(requested)!r}: unsupported type {device.type!r} (use 'mps', 'cuda', 'cuda:N' or 'cpu')"
    )


def _why_no_mps() -> str:
    if not mps_built():
        return "this PyTorch build has no MPS support (MPS needs PyTorch for macOS on Apple silicon)"
    return "MPS is not available (it needs macOS 12.3+ and an Apple silicon or AMD GPU)"


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """The MLX backend's names ("float32", "bfloat16", "float16") plus "float64" for CPU/CUDA checks."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise PaliGemmaError(f"dtype: unsupported {dtype} (choose from {', '.join(DTYPES)})")
        return dtype
    if dtype not in DTYPES:
        raise PaliGemmaError(f"dtype: unsupported {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def supports_bf16(device: torch.device) -> bool:
    if device.type == "mps":
        return mps_supports_bf16()
    if device.type == "cuda":
        return cuda_supports_bf16(device.index or 0)
    return True  # CPU kernels exist for bf16 everywhere


def choose_dtype(dtype: torch.dtype, device: torch.device, *, bf16: Optional[bool] = None) -> torch.dtype:
    """The dtype actually used on `device`, with a warning whenever it differs from the request.

    MPS has no float64 at all (float32 instead); bfloat16 falls back to float16 on GPUs
    without it (MPS before macOS 14, CUDA before Ampere). The CPU keeps what it is given.
    """
    if device.type == "mps" and dtype == torch.float64:
        logger.warning("MPS has no float64: computing in float32 instead")
        return torch.float32
    if dtype == torch.bfloat16 and device.type in ("mps", "cuda"):
        bf16 = supports_bf16(device) if bf16 is None else bf16
        if not bf16:
            need = "macOS 14 or newer" if device.type == "mps" else "a GPU of compute capability 8.0 or newer"
            logger.warning(
                "bfloat16 on %s needs %s: computing in float16 instead (a narrower range: "
                "use dtype='float32' if logits overflow to inf/nan)",
                device,
                need,
            )
            return torch.float16
    return dtype


def warn_if_env_too_late(device: torch.device) -> None:
    """The MPS fallback only works if it was in the environment when torch was imported."""
    if device.type == "mps" and env.TORCH_WAS_IMPORTED_FIRST and "PYTORCH_ENABLE_MPS_FALLBACK" in env.APPLIED:
        logger.warning(
            "torch was imported before mlx_paligemma.reference could set "
            "PYTORCH_ENABLE_MPS_FALLBACK=1, so MPS ops without a kernel will raise; "
            "export PYTORCH_ENABLE_MPS_FALLBACK=1 in the shell to enable the CPU fallback"
        )


def as_tensor(x: Any, device: torch.device) -> torch.Tensor:
    """numpy or torch -> torch on `device`: integers as int64, float64 never sent to MPS."""
    return host_tensor(x, device).to(device)


def host_tensor(x: Any, device: torch.device) -> torch.Tensor:
    """The tensor `as_tensor` sends to `device`, before it is sent (split out to be testable off a Mac)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dtype == torch.float64 and device.type == "mps":
        return x.float()
    if not x.is_floating_point() and x.dtype != torch.bool:
        return x.long()
    return x
