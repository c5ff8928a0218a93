"""`mlx-paligemma doctor`: what this machine offers MLX and PyTorch, and whether each backend computes right.

    mlx-paligemma doctor [--json]        (also: python -m mlx_paligemma doctor, python tools/check_backend.py)

Prints the platform, MLX (version, default device, on Linux the BLAS it loaded), torch (version,
MPS, CUDA); then checks the ops PaliGemma needs (matmul, softmax, conv2d, SDPA, RMS norm,
bf16/fp16 casts) on every available backend against float64 numpy, and runs a tiny PaliGemma 1
and 2 (built by `tools/make_tiny_checkpoint.py`) on every backend, torch logits against MLX logits,
and the shipped demo model on MLX against the PyTorch reference's logits stored beside it
(`demo/forward_check.json`, written when the model is shipped). Exit status 0 only if every check
on every available backend passes. Without torch (the plain install) the op checks and the demo
model's forward still run; the tiny checkpoints are not built (that needs torch).

A slow or wrong backend is far easier to diagnose here than inside a 3B model: e.g. the MLX
CPU wheel on Linux ships the unoptimised reference BLAS, and an MPS op without a kernel
either raises or silently runs on the CPU (PYTORCH_ENABLE_MPS_FALLBACK).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import allocator
from .blas import ENV_VAR, blas_report
from .cli import ArgumentParser, main_entry

# Normalised error max|out - ref| / max(1, max|ref|) allowed per check. float32 kernels land near
# 1e-6 on CPUs; GPUs get room for TF32 convolutions (cuDNN's default) and fast-math reductions.
# A broken kernel is off by O(1). Casts are bounded by the format's rounding: bf16 2^-9, fp16 2^-11.
TOL_FP32 = {"cpu": 1e-4, "gpu": 2e-3}
TOL_CAST = {"bfloat16": 2.0**-8, "float16": 2.0**-10}
TOL_LOGITS = {"cpu": 1e-4, "gpu": 2e-3}  # normalised by the largest |logit|


@dataclass
class Result:
    backend: str
    check: str
    status: str  # PASS, FAIL or SKIP (not applicable here: counts as passing)
    seconds: float
    detail: str


# -- environment ------------------------------------------------------------------------------
def mlx_info() -> dict[str, str]:
    """MLX's version and device, and on Linux which BLAS its CPU matmuls use (`blas.blas_report`)."""
    import mlx.core as mx

    device = mx.default_device()
    if device == mx.gpu:
        cuda = getattr(mx, "cuda", None)
        kind = "Metal GPU" if mx.metal.is_available() else "CUDA GPU" if cuda and cuda.is_available() else "GPU"
    else:
        kind = "CPU"
    info = {"mlx": f"{mx.__version__}, default device: {kind}"}
    if sys.platform.startswith("linux"):
        info["mlx BLAS"] = describe_blas(blas_report())
        info["malloc"] = allocator.describe()
    return info


def describe_blas(report: dict) -> str:
    """One line: the BLAS MLX uses, and what to do when it is the slow one."""
    names = {"mkl": "Intel MKL", "openblas": "OpenBLAS", "reference": "reference BLAS, unoptimised: slow CPU matmuls"}
    line = names.get(report["mlx_blas"], report["mlx_blas"])
    if report["preloaded"]:
        line += f" (preloaded by mlx_paligemma: {Path(report['preloaded']).name})"
    if report["too_late"]:
        line += "; mlx.core was imported before mlx_paligemma, too late to preload: import mlx_paligemma first"
    elif report["mlx_blas"] == "reference":
        if report["requested"] == "off":
            line += f"; {ENV_VAR}=off keeps it"
        else:
            line += "; pip install mkl (Linux x86_64) or apt-get install libopenblas0 for ~100x faster matmuls"
    if report["error"]:
        line += f"; {report['error']}"
    return line


def torch_installed() -> bool:
    """Whether the PyTorch backend imports (importing it first sets the MPS variables, then imports torch)."""
    try:
        from . import reference  # noqa: F401
    except ImportError:  # MissingDependencyError is one
        return False
    return True


def torch_info() -> dict[str, str]:
    if not torch_installed():
        return {"torch": "not installed: the PyTorch reference backend is unavailable (pip install torch)"}
    import torch

    from .reference import choose_device, env  # first: it sets the MPS variables, then imports torch

    cuda = torch.cuda.is_available()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ""
    applied = ", ".join(f"{k}={v}" for k, v in env.APPLIED.items()) or "none (already set by the user)"
    late = (
        " (torch was imported before the package set them: the MPS fallback only works if exported in the shell)"
        if env.TORCH_WAS_IMPORTED_FIRST
        else ""
    )
    return {
        "torch": torch.__version__,
        "MPS": f"built: {yn(torch.backends.mps.is_built())}, available: {yn(torch.backends.mps.is_available())}",
        "CUDA": f"available: {yn(cuda)}" + (f" ({names})" if names else ""),
        "reference default device": str(choose_device()),
        "MPS env set by the package": applied + late,
    }


def yn(flag: bool) -> str:
    return "yes" if flag else "no"


# -- ops --------------------------------------------------------------------------------------
def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    L = 7
    return dict(
        a=f(48, 64),
        b=f(64, 40),
        x=f(3, 96),
        pixels=f(2, 3, 28, 28),
        conv_w=f(16, 3, 14, 14) * 0.1,
        q=f(2, 4, L, 16),
        k=f(2, 4, L, 16),
        v=f(2, 4, L, 16),
        mask=np.tril(np.ones((L, L), bool)),
        norm_w=f(96),
    )


def reference_ops(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float64 numpy: the truth every backend is measured against."""
    g = {k: v.astype(np.float64) if v.dtype != bool else v for k, v in d.items()}
    e = np.exp(g["x"] - g["x"].max(-1, keepdims=True))
    B, C, H, W = g["pixels"].shape
    P = g["conv_w"].shape[-1]
    patches = g["pixels"].reshape(B, C, H // P, P, W // P, P).transpose(0, 2, 4, 1, 3, 5)
    scores = g["q"] @ g["k"].swapaxes(-1, -2) / np.sqrt(g["q"].shape[-1])
    scores = np.where(g["mask"], scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    return {
        "matmul": g["a"] @ g["b"],
        "softmax": e / e.sum(-1, keepdims=True),
        "conv2d": np.einsum("bhwcij,ocij->bohw", patches, g["conv_w"]),
        "sdpa": (w / w.sum(-1, keepdims=True)) @ g["v"],
        "rms_norm": g["x"] / np.sqrt((g["x"] ** 2).mean(-1, keepdims=True) + 1e-6) * g["norm_w"],
        "cast bfloat16": g["x"],
        "cast float16": g["x"],
    }


class MLXBackend:
    def __init__(self):
        import mlx.core as mx

        self.mx = mx
        self.name = f"mlx ({'gpu' if mx.default_device() == mx.gpu else 'cpu'})"
        self.kind = "gpu" if mx.default_device() == mx.gpu else "cpu"

    def ops(self, d: dict[str, np.ndarray]) -> dict[str, Callable[[], np.ndarray]]:
        mx = self.mx
        a = {k: mx.array(v) for k, v in d.items()}
        out = lambda x: np.asarray(x.astype(mx.float32), dtype=np.float64)  # noqa: E731
        return {
            "matmul": lambda: out(a["a"] @ a["b"]),
            "softmax": lambda: out(mx.softmax(a["x"], axis=-1)),
            "conv2d": lambda: out(
                mx.conv2d(a["pixels"].transpose(0, 2, 3, 1), a["conv_w"].transpose(0, 2, 3, 1), stride=14).transpose(
                    0, 3, 1, 2
                )
            ),
            "sdpa": lambda: out(
                mx.fast.scaled_dot_product_attention(a["q"], a["k"], a["v"], scale=16**-0.5, mask=a["mask"])
            ),
            "rms_norm": lambda: out(mx.fast.rms_norm(a["x"], a["norm_w"], 1e-6)),
            "cast bfloat16": lambda: out(a["x"].astype(mx.bfloat16)),
            "cast float16": lambda: out(a["x"].astype(mx.float16)),
        }


class TorchBackend:
    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.name = f"torch {device}"
        self.kind = "cpu" if device == "cpu" else "gpu"

    def ops(self, d: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
        torch = self.torch
        import torch.nn.functional as F

        from .reference.device import supports_bf16

        t = {k: torch.from_numpy(v).to(self.device) for k, v in d.items()}
        out = lambda x: x.float().cpu().numpy().astype(np.float64)  # noqa: E731
        ops = {
            "matmul": lambda: out(t["a"] @ t["b"]),
            "softmax": lambda: out(torch.softmax(t["x"], dim=-1)),
            "conv2d": lambda: out(F.conv2d(t["pixels"], t["conv_w"], stride=14)),
            "sdpa": lambda: out(
                F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["mask"], scale=16**-0.5)
            ),
            "rms_norm": lambda: out(F.rms_norm(t["x"], (t["x"].shape[-1],), t["norm_w"], 1e-6)),
            "cast bfloat16": lambda: out(t["x"].to(torch.bfloat16)),
            "cast float16": lambda: out(t["x"].to(torch.float16)),
        }
        if not supports_bf16(self.device):
            ops["cast bfloat16"] = None  # the reference falls back to float16 here
        return ops


def op_checks(backend) -> list[Result]:
    d = inputs()
    truth = reference_ops(d)
    results = []
    for name, op in backend.ops(d).items():
        if op is None:
            results.append(Result(backend.name, name, "SKIP", 0.0, "not supported here; float16 is used instead"))
            continue
        start = time.perf_counter()
        try:
            got = op()
        except Exception as e:  # a missing kernel is a result to report, not a crash of the doctor
            results.append(
                Result(
                    backend.name,
                    name,
                    "FAIL",
                    time.perf_counter() - start,
                    f"{type(e).__name__}: {str(e).splitlines()[0][:120]}",
                )
            )
            continue
        seconds = time.perf_counter() - start
        ref = truth[name]
        err = float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
        tol = TOL_CAST[name.split()[1]] if name.startswith("cast") else TOL_FP32[backend.kind]
        ok = got.shape == ref.shape and err <= tol
        results.append(
            Result(
                backend.name,
                name,
                "PASS" if ok else "FAIL",
                seconds,
                f"normalised error {err:.1e} (tolerance {tol:.0e})",
            )
        )
    return results


# -- tiny model forward -----------------------------------------------------------------------
def forward_checks(devices: list[str], mlx_name: str, workdir: Path) -> list[Result]:
    """MLX logits of a tiny PaliGemma 1 and 2, then the torch reference on each device against them."""
    import mlx.core as mx

    import mlx_paligemma

    skipped = _why_no_tiny_checkpoint()
    if skipped == _NO_TORCH:
        return []  # the demo model's forward check stands in for them (main)
    if skipped:
        return [
            Result(mlx_name, f"tiny {label} forward", "SKIP", 0.0, skipped) for label in ("PaliGemma 1", "PaliGemma 2")
        ]
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    if devices:
        from mlx_paligemma import reference

    results = []
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for label, kwargs in (("PaliGemma 1", dict(version=1)), ("PaliGemma 2", dict(version=2, sliding_window=8))):
        ckpt = make_tiny_checkpoint(workdir / label.replace(" ", ""), **kwargs)
        start = time.perf_counter()
        try:
            model, processor = mlx_paligemma.load(ckpt)
            batch = {
                k: np.asarray(v)
                for k, v in processor(images=[image], prompts=["caption en"], suffixes=["a cat"]).items()
            }
            expected = np.asarray(
                model(
                    batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["token_type_ids"]
                ).astype(mx.float32)
            )
        except Exception as e:
            results.append(
                Result(
                    mlx_name, f"tiny {label} forward", "FAIL", time.perf_counter() - start, f"{type(e).__name__}: {e}"
                )
            )
            continue
        results.append(
            Result(
                mlx_name,
                f"tiny {label} forward",
                "PASS",
                time.perf_counter() - start,
                f"logits {tuple(expected.shape)}",
            )
        )
        scale = max(1.0, float(np.abs(expected).max()))
        for device in devices:
            start = time.perf_counter()
            kind = "cpu" if device == "cpu" else "gpu"
            try:
                ref_model, _ = reference.load(ckpt, device=device, dtype="float32")
                got = ref_model(**batch).float().cpu().numpy()
                err = float(np.abs(got - expected).max()) / scale
                status = "PASS" if got.shape == expected.shape and err <= TOL_LOGITS[kind] else "FAIL"
                detail = f"vs mlx: normalised max diff {err:.1e} (tolerance {TOL_LOGITS[kind]:.0e})"
            except Exception as e:
                status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            results.append(
                Result(f"torch {device}", f"tiny {label} forward", status, time.perf_counter() - start, detail)
            )
    return results


DEMO_REFERENCE = "forward_check.json"
_NO_TORCH = "skipped: the tiny checkpoint is built with torch, which is not installed (pip install torch)"
_DEMO_INPUT = {"image": "examples/shapes1.png", "prompt": "caption en", "suffix": "a red triangle", "positions": 6}


def _demo_batch(processor, model_dir: Path) -> dict[str, np.ndarray]:
    """The demo checks' input: an example image, a prompt and a teacher-forced answer (prefix and causal
    suffix positions both covered), as numpy arrays."""
    image = model_dir / _DEMO_INPUT["image"]
    batch = processor(images=[image], prompts=[_DEMO_INPUT["prompt"]], suffixes=[_DEMO_INPUT["suffix"]])
    return {k: np.asarray(v) for k, v in batch.items()}


def write_demo_reference(model_dir: Path) -> Path:
    """Store the PyTorch reference backend's float32 logits (last positions of `_DEMO_INPUT`) beside a
    demo model, for the doctor's check on machines without torch. Needs torch (run when shipping)."""
    import torch

    from .fsutil import atomic_write_text
    from .reference import load as load_torch

    model, processor = load_torch(model_dir, device="cpu", dtype="float32")
    batch = _demo_batch(processor, Path(model_dir))
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).float().numpy()
    last = logits[0, -_DEMO_INPUT["positions"] :]
    record = dict(_DEMO_INPUT, computed_by=f"mlx_paligemma.reference (torch {torch.__version__}), float32, CPU")
    record["logits"] = [[float(f"{v:.7g}") for v in row] for row in last.tolist()]
    path = Path(model_dir) / DEMO_REFERENCE
    atomic_write_text(path, json.dumps(record) + "\n")
    return path


def demo_forward_check(mlx_name: str, kind: str, model_dir: Optional[Path] = None) -> Result:
    """MLX logits of the shipped demo model against the PyTorch reference's, stored with the model."""
    import mlx_paligemma
    from mlx_paligemma.checkpoint import resolve_model_dir

    model_dir = Path(model_dir) if model_dir is not None else Path(mlx_paligemma.__file__).parent / "demo"
    start = time.perf_counter()
    name = "demo model forward"
    try:
        reference = json.loads((model_dir / DEMO_REFERENCE).read_text())
        model, processor = mlx_paligemma.load(resolve_model_dir(model_dir), dtype="float32")
        batch = _demo_batch(processor, model_dir)
        logits = np.asarray(model(**batch)[0, -reference["positions"] :])
    except Exception as e:  # a missing file or a broken kernel is a result to report
        return Result(mlx_name, name, "FAIL", time.perf_counter() - start, f"{type(e).__name__}: {e}")
    expected = np.asarray(reference["logits"], dtype=np.float64)
    err = float(np.abs(logits - expected).max()) / max(1.0, float(np.abs(expected).max()))
    ok = logits.shape == expected.shape and err <= TOL_LOGITS[kind]
    detail = f"vs stored PyTorch logits: normalised max diff {err:.1e} (tolerance {TOL_LOGITS[kind]:.0e})"
    return Result(mlx_name, name, "PASS" if ok else "FAIL", time.perf_counter() - start, detail)


def _why_no_tiny_checkpoint() -> str:
    """Why the tiny checkpoint cannot be built here ("" when it can)."""
    if not torch_installed():
        return _NO_TORCH
    try:
        import tools.make_tiny_checkpoint  # noqa: F401
    except ImportError:
        return "skipped: the tiny checkpoint builder (tools/) is part of a source checkout: run from the repository"
    return ""


# -- report -----------------------------------------------------------------------------------
def torch_devices() -> list[str]:
    if not torch_installed():
        return []
    import torch

    devices = ["cpu"]
    if torch.backends.mps.is_available():
        devices.append("mps")
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def print_report(info: dict[str, str], results: list[Result]) -> None:
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print()
    bw, cw = max(len(r.backend) for r in results), max(len(r.check) for r in results)
    print(f"{'backend':<{bw}}  {'check':<{cw}}  result  {'time':>9}  detail")
    for r in results:
        print(f"{r.backend:<{bw}}  {r.check:<{cw}}  {r.status:<6}  {r.seconds * 1000:7.1f}ms  {r.detail}")
    failed = [r for r in results if r.status == "FAIL"]
    backends = ", ".join(dict.fromkeys(r.backend for r in results))
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(results) - len(failed)}/{len(results)} checks passed on {backends}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="mlx-paligemma doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)

    info = {"platform": platform.platform(), "python": platform.python_version()}
    info.update(mlx_info())  # before anything imports torch
    info.update(torch_info())
    mlx_backend = MLXBackend()
    devices = torch_devices()
    results = op_checks(mlx_backend)
    for device in devices:
        results += op_checks(TorchBackend(device))
    with tempfile.TemporaryDirectory(prefix="mlx-paligemma-doctor-") as tmp:
        results += forward_checks(devices, mlx_backend.name, Path(tmp))
    results.append(demo_forward_check(mlx_backend.name, mlx_backend.kind))
    if args.json:
        print(json.dumps({"environment": info, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        print_report(info, results)
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    main_entry(main)
