"""Side-by-side generation benchmark of every local runtime on one checkpoint, with the machine's bounds.

    python -m benchmarks.compare_backends --preset mid                       # random weights, no download
    python -m benchmarks.compare_backends --model google/paligemma-3b-mix-224 --image cat.jpg
    python -m benchmarks.compare_backends --preset 3b --runtimes mlx,torch,torch-fp32 --json out.json --chart out.png

Runtimes, each in its own process, one after another (clean peak memory, no shared thread pools):
`mlx` (this package, the device's default dtype), `torch` (the PyTorch reference at its fastest
dtype: bf16 on CPU and CUDA, fp16 on MPS), `torch-fp32`, and when installed `mlx-vlm` (float32
weights, OpenBLAS preloaded: its best CPU setup) and `transformers` (float32). Each does a warm-up,
then R greedy generations with EOS ignored; the table shows medians. In the same run every worker
measures its framework's GEMM (GFLOP/s) and GEMV (GB/s of weights read) and one worker the memory
read bandwidth: decode is reported as a fraction of its bound (weight bytes per token over the best
GEMV bandwidth measured), prefill as a fraction of the framework's GEMM throughput.
Output: a markdown table on stdout, `--json`, a PNG `--chart` (matplotlib: the `bench` extra).
"""

# ruff: noqa: I001  (in the workers mlx_paligemma is imported before mlx.core on purpose: it preloads the BLAS)
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PROG = "compare_backends"
RUNTIMES = ("mlx", "torch", "torch-fp32", "mlx-vlm", "transformers")
OPTIONAL = {"mlx-vlm": "mlx_vlm", "transformers": "transformers"}
# Probe sizes: "full" is past every cache (GEMV 256 MB, memory read 1 GiB); "small" only checks that the
# benchmark runs (CI): its figures sit in the caches and mean nothing.
PROBES = {
    "full": dict(gemm_n=2048, gemv_shape=(16384, 4096), read_mb=1024),
    "small": dict(gemm_n=256, gemv_shape=(1024, 512), read_mb=16),
}
PROBE = dict(PROBES["full"])


# --- measurements (run inside the workers) ------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _mlx_matmul_speed(dtype_name: str) -> dict:
    import mlx.core as mx

    dtype = getattr(mx, dtype_name)
    n, shape = PROBE["gemm_n"], PROBE["gemv_shape"]
    a = mx.random.normal((n, n)).astype(dtype)
    w = mx.random.normal(shape).astype(dtype)
    x = mx.random.normal((1, shape[1])).astype(dtype)
    mx.eval(a, w, x)
    gemm = 2 * n**3 / _median_time(lambda: mx.eval(a @ a), 3) / 1e9
    gemv = w.nbytes / _median_time(lambda: mx.eval(x @ w.T), 7) / 1e9
    return dict(gemm_gflops=gemm, gemv_gbps=gemv)


def _torch_matmul_speed(dtype_name: str, device: Any) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    sync = getattr(getattr(torch, device.type, None), "synchronize", None) if device.type != "cpu" else None

    def timed(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            fn()
            if sync:
                sync()

        return run

    n, shape = PROBE["gemm_n"], PROBE["gemv_shape"]
    a = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(*shape, device=device).to(dtype)
    x = torch.randn(1, shape[1], device=device).to(dtype)
    with torch.no_grad():
        gemm = 2 * n**3 / _median_time(timed(lambda: a @ a), 3) / 1e9
        gemv = w.numel() * w.element_size() / _median_time(timed(lambda: x @ w.T), 7) / 1e9
    return dict(gemm_gflops=gemm, gemv_gbps=gemv)


def memory_read_bandwidth() -> float:
    """GB/s of a multi-threaded sum over 1 GiB (torch, every core), the best of a few."""
    import torch

    big = torch.ones(PROBE["read_mb"] * 256 * 1024, dtype=torch.float32)
    best = min(_time_once(lambda: big.sum().item()) for _ in range(5))
    return big.numel() * 4 / best / 1e9


def _time_once(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def _peak_rss_gb() -> float:
    """Peak resident memory of this worker: VmHWM on Linux (getrusage's ru_maxrss survives execve, so it
    would report the parent's peak when that is higher), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 / 1e9 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _image(path: Optional[str]):
    from PIL import Image

    from tests.helpers import noise_image

    return Image.open(path).convert("RGB") if path else noise_image(640, 480)


def _summarise(runs: list[dict]) -> dict:
    """Medians over the timed runs."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


# --- workers ------------------------------------------------------------------------------------------------


def _worker_package(args: Any, backend: str) -> dict:
    """This package: MLX (`mlx`) or its PyTorch reference (`torch`, `torch-fp32`), through the public API."""
    import mlx_paligemma as mp  # first: the fast BLAS

    tic = time.perf_counter()
    if backend == "mlx":
        import mlx.core as mx

        model, processor = mp.load(args.model, dtype=args.dtype)
        device, dtype = f"mlx {mx.default_device()}", str(model.dtype).replace("mlx.core.", "")
        blas = mp.blas.blas_report()["mlx_blas"]
        speed = lambda: _mlx_matmul_speed(dtype)  # noqa: E731
    else:
        from mlx_paligemma import reference
        from mlx_paligemma.reference.device import choose_device

        target = choose_device(args.device)
        want = "float32" if backend == "torch-fp32" else ("float16" if target.type == "mps" else "bfloat16")
        model, processor = reference.load(args.model, device=target, dtype=want)
        device, dtype = f"torch {model.device}", str(model.dtype).replace("torch.", "")
        blas = "torch's own (MKL / oneDNN)" if model.device.type == "cpu" else model.device.type
        speed = lambda: _torch_matmul_speed(dtype, model.device)  # noqa: E731
    load_s = time.perf_counter() - tic
    processor.tokenizer.eos_id = -1  # EOS ignored: every run generates exactly max_tokens
    image = _image(args.image)

    def one(max_tokens: int) -> dict:
        tic = time.perf_counter()
        chunks = list(mp.stream_generate(model, processor, image, args.prompt, max_tokens=max_tokens))
        n, s = len(chunks), chunks[-1].stats
        return dict(
            vision_s=s.vision_time,
            ttft_s=s.vision_time + s.prefill_time,
            prompt_tokens=s.prompt_tokens,
            prefill_tps=s.prefill_tps,
            decode_tps=s.generation_tps,
            generated=n,
            total_s=time.perf_counter() - tic,
        )

    one(min(4, args.max_tokens + 1))  # warm-up
    runs = [one(args.max_tokens + 1) for _ in range(args.runs)]
    return dict(device=device, dtype=dtype, blas=blas, load_s=load_s, **_summarise(runs), **speed())


def _worker_mlx_vlm(args: Any) -> dict:
    """mlx-vlm at its best CPU setup: float32 weights, OpenBLAS preloaded (set by the parent's environment)."""
    from mlx_paligemma import blas  # noqa: F401  preloads what MLX_PALIGEMMA_BLAS names, before mlx.core
    import mlx.core as mx
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    tic = time.perf_counter()
    model, processor = load(args.model)
    if args.dtype or mx.default_device().type == mx.DeviceType.cpu:
        model.set_dtype(getattr(mx, args.dtype or "float32"))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - tic
    from mlx.utils import tree_flatten

    dtype = str(tree_flatten(model.language_model.parameters())[0][1].dtype).replace("mlx.core.", "")
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    tokenizer.stopping_criteria = lambda token: False  # EOS ignored
    prompt = apply_chat_template(processor, model.config, args.prompt, num_images=1)
    with tempfile.TemporaryDirectory() as tmp:
        image_path = str(Path(tmp) / "image.png")
        _image(args.image).save(image_path)

        def one(max_tokens: int) -> dict:
            tic = time.perf_counter()
            stamps = []
            for r in stream_generate(model, processor, prompt, [image_path], max_tokens=max_tokens, temperature=0.0):
                stamps.append(time.perf_counter())
                prompt_tokens = r.prompt_tokens
            n = len(stamps)
            return dict(
                vision_s=None,
                ttft_s=stamps[0] - tic,
                prompt_tokens=prompt_tokens,
                prefill_tps=prompt_tokens / (stamps[0] - tic),
                decode_tps=(n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0,
                generated=n,
                total_s=stamps[-1] - tic,
            )

        one(min(4, args.max_tokens + 1))
        runs = [one(args.max_tokens + 1) for _ in range(args.runs)]
    from mlx_paligemma.blas import blas_report

    return dict(
        device=f"mlx {mx.default_device()}",
        dtype=dtype,
        blas=blas_report()["mlx_blas"],
        load_s=load_s,
        **_summarise(runs),
        **_mlx_matmul_speed(dtype),
    )


def _worker_transformers(args: Any) -> dict:
    """transformers' PaliGemmaForConditionalGeneration.generate, float32 (CPU) with its own processor."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    from mlx_paligemma.reference.device import choose_device

    device = choose_device(args.device)
    dtype = getattr(torch, args.dtype or "float32")
    tic = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    load_s = time.perf_counter() - tic
    inputs = processor(images=_image(args.image), text=args.prompt, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    prompt_tokens = int(inputs["input_ids"].shape[1])

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # first call: the prompt; then one per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def one(max_tokens: int) -> dict:
        stamps = Stamps()
        with torch.no_grad():
            tic = time.perf_counter()
            model.get_image_features(inputs["pixel_values"])
            vision = time.perf_counter() - tic
            tic = time.perf_counter()
            model.generate(
                **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, streamer=stamps
            )
        new = stamps.times[1:]
        return dict(
            vision_s=vision,
            ttft_s=new[0] - tic,
            prompt_tokens=prompt_tokens,
            prefill_tps=prompt_tokens / max(new[0] - tic - vision, 1e-9),
            decode_tps=(len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 else 0.0,
            generated=len(new),
            total_s=new[-1] - tic,
        )

    one(min(4, args.max_tokens + 1))
    runs = [one(args.max_tokens + 1) for _ in range(args.runs)]
    return dict(
        device=f"torch {device}",
        dtype=str(dtype).replace("torch.", ""),
        blas="torch's own (MKL / oneDNN)",
        load_s=load_s,
        **_summarise(runs),
        **_torch_matmul_speed(str(dtype).replace("torch.", ""), device),
    )


def worker(args: Any) -> int:
    """One runtime, several runs; prints one JSON line last."""
    PROBE.update(PROBES[args.probes])
    if args.worker == "machine":
        result = dict(memory_read_gbps=memory_read_bandwidth())
    elif args.worker == "mlx-vlm":
        result = _worker_mlx_vlm(args)
    elif args.worker == "transformers":
        result = _worker_transformers(args)
    else:
        result = _worker_package(args, args.worker)
    result.update(runtime=args.worker, peak_rss_gb=_peak_rss_gb())
    print(json.dumps(result))
    return 0


# --- the parent: checkpoint, runs, analysis, output ---------------------------------------------------------


def checkpoint_profile(model_dir: Path) -> dict:
    """Parameter counts from the safetensors headers (no tensor is read): what one token reads and
    what the prefill computes."""
    from safetensors import safe_open

    counts = {"vision": 0, "projector": 0, "embed": 0, "layers": 0}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                if "vision" in name:
                    counts["vision"] += n
                elif "multi_modal_projector" in name:
                    counts["projector"] += n
                elif "embed_tokens" in name or name.endswith("lm_head.weight"):
                    counts["embed"] += n
                else:
                    counts["layers"] += n
    config = json.loads((model_dir / "config.json").read_text())
    t, v = config.get("text_config", {}), config.get("vision_config", {})
    counts.update(
        text_layers=t.get("num_hidden_layers", 18),
        text_attn_width=t.get("num_attention_heads", 8) * t.get("head_dim", 256),
        vision_layers=v.get("num_hidden_layers", 27),
        vision_width=v.get("hidden_size", 1152),
        image_tokens=(v.get("image_size", 224) // v.get("patch_size", 14)) ** 2,
    )
    return counts


def prefill_flops(profile: dict, prompt_tokens: int) -> float:
    """Vision tower on every patch, decoder on every prompt token, the head on the last one (plus attention)."""
    n, L = profile["image_tokens"], prompt_tokens
    flops = 2 * (profile["vision"] + profile["projector"]) * n + 2 * profile["layers"] * L + 2 * profile["embed"]
    flops += 4 * n * n * profile["vision_width"] * profile["vision_layers"]
    flops += 4 * L * L * profile["text_attn_width"] * profile["text_layers"]
    return float(flops)


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def analyse(rows: list[dict], machine: dict, profile: dict) -> None:
    """Decode against the bandwidth bound, prefill against matmul throughput, in place."""
    ok = [r for r in rows if "error" not in r]
    best_gemv = max([r["gemv_gbps"] for r in ok] + [machine.get("memory_read_gbps") or 0.0])
    machine["best_gemv_gbps"] = max(r["gemv_gbps"] for r in ok) if ok else None
    for r in ok:
        itemsize = ITEMSIZE.get(r["dtype"], 4)
        r["weights_per_token_gb"] = (profile["layers"] + profile["embed"]) * itemsize / 1e9
        r["decode_bound_tps"] = best_gemv / r["weights_per_token_gb"]
        r["decode_of_bound"] = r["decode_tps"] / r["decode_bound_tps"]
        r["prefill_gflop"] = prefill_flops(profile, int(r["prompt_tokens"])) / 1e9
        r["prefill_of_gemm"] = r["prefill_gflop"] / r["ttft_s"] / r["gemm_gflops"]


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"{report['checkpoint']} | prompt {s['prompt']!r} + image, {s['max_tokens']} new tokens after the first "
        f"(EOS ignored), median of {s['runs']} after a warm-up",
        f"machine: {m['description']}; memory read {_fmt(m.get('memory_read_gbps'), '.1f')} GB/s, "
        f"best GEMV {_fmt(m.get('best_gemv_gbps'), '.1f')} GB/s",
        "",
        "| runtime | dtype | BLAS | load s | vision s | prefill s (vision + prompt + 1st token) | prefill tok/s "
        "| decode tok/s | decode / bound | prefill / GEMM | peak RSS GB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runtimes"]:
        if "error" in r:
            lines.append(f"| {r['runtime']} | failed: {r['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['runtime']} | {r['dtype']} | {r['blas']} | {r['load_s']:.1f} | {_fmt(r['vision_s'], '.2f')} | "
            f"{r['ttft_s']:.2f} | {r['prefill_tps']:.0f} | {r['decode_tps']:.2f} | "
            f"{r['decode_of_bound']:.0%} of {r['decode_bound_tps']:.1f} | {r['prefill_of_gemm']:.0%} | "
            f"{r['peak_rss_gb']:.2f} |"
        )
    lines += ["", "| framework (in its runtime's dtype) | GEMM GFLOP/s | GEMV GB/s |", "| --- | ---: | ---: |"]
    for r in report["runtimes"]:
        if "error" not in r:
            lines.append(
                f"| {r['runtime']} ({r['dtype']}, {r['blas']}) | {r['gemm_gflops']:.0f} | {r['gemv_gbps']:.1f} |"
            )
    ratios = report.get("ratios") or {}
    if ratios:
        lines.append("")
        lines += [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict:
    by = {r["runtime"]: r for r in rows if "error" not in r}
    out = {}
    if "mlx" in by:
        for other in ("mlx-vlm", "torch", "torch-fp32", "transformers"):
            if other in by:
                out[f"mlx decode vs {other}"] = by["mlx"]["decode_tps"] / by[other]["decode_tps"]
                out[f"mlx prefill (time to first token) vs {other}"] = by[other]["ttft_s"] / by["mlx"]["ttft_s"]
    return out


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlx_paligemma.fsutil import atomic_path

    rows = [r for r in report["runtimes"] if "error" not in r]
    names = [f"{r['runtime']}\n{r['dtype']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [r["decode_tps"] for r in rows], color="tab:blue", label="measured")
    ax1.scatter(names, [r["decode_bound_tps"] for r in rows], color="black", marker="_", s=800, label="bandwidth bound")
    ax1.set_ylabel("decode tokens/s (higher is better)")
    ax1.legend()
    ax2.bar(names, [r["ttft_s"] for r in rows], color="tab:orange")
    ax2.set_ylabel("prefill s: vision + prompt + 1st token (lower is better)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{report['checkpoint']} on {report['machine']['description']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}"


def _run_worker(runtime: str, args: Any, model_dir: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compare_backends", "--worker", runtime, "--model", model_dir]
    cmd += ["--prompt", args.prompt, "--max-tokens", str(args.max_tokens), "--runs", str(args.runs)]
    cmd += ["--probes", args.probes]
    for flag, value in (("--image", args.image), ("--device", args.device)):
        if value:
            cmd += [flag, value]
    if args.dtype and runtime in ("mlx", "mlx-vlm", "transformers"):
        cmd += ["--dtype", args.dtype]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if runtime == "mlx-vlm" and sys.platform == "linux":
        env["MLX_PALIGEMMA_BLAS"] = args.vlm_blas
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return dict(runtime=runtime, error=lines[-1][:200] if lines else f"exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build_parser():
    from mlx_paligemma.cli import ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or hub id")
    source.add_argument("--preset", choices=("tiny", "mid", "3b"), help="build a random checkpoint (default: mid)")
    p.add_argument("--preset-dtype", default=None, help="dtype of the preset's weights (default: the preset's)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, from {', '.join(RUNTIMES)}")
    p.add_argument("--image", help="image file (default: 640x480 noise)")
    p.add_argument("--prompt", default="caption en")
    p.add_argument("--max-tokens", type=int, default=32, help="decode tokens timed after the first (default 32)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (default 3)")
    p.add_argument("--dtype", default=None, help="compute dtype for mlx, mlx-vlm, transformers (default: per device)")
    p.add_argument("--device", default=None, help="torch device (default: MPS, else CUDA, else CPU)")
    p.add_argument("--vlm-blas", default="openblas", help="BLAS preloaded for mlx-vlm on Linux (default openblas)")
    p.add_argument(
        "--probes", choices=tuple(PROBES), default="full", help="machine probe sizes (small: a quick check, CI)"
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--chart", type=Path, help="also draw a PNG chart here (needs matplotlib: pip install '.[bench]')")
    p.add_argument("--worker", help=argparse_suppress())
    return p


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mlx_paligemma.cli import fail, run_main

    args = _build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    return run_main(PROG, lambda: _compare(args, fail))


def _compare(args: Any, fail: Callable[[str, str], int]) -> int:
    from tqdm import tqdm

    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        return fail(PROG, f"--runtimes: unknown {', '.join(unknown)} (choose from {', '.join(RUNTIMES)})")
    if args.runs < 1 or args.max_tokens < 1:
        return fail(PROG, "--runs and --max-tokens must be at least 1")
    if args.chart and importlib.util.find_spec("matplotlib") is None:
        return fail(PROG, "--chart needs matplotlib: pip install -e '.[bench]'")
    skipped = [r for r in runtimes if r in OPTIONAL and importlib.util.find_spec(OPTIONAL[r]) is None]
    runtimes = [r for r in runtimes if r not in skipped]
    with tempfile.TemporaryDirectory() as tmp:
        bar = tqdm(total=len(runtimes) + 2, desc=PROG, file=sys.stderr, unit="step")
        if args.model:
            from mlx_paligemma.checkpoint import resolve_model_dir

            bar.set_postfix_str("resolving the checkpoint")
            model_dir, name = Path(resolve_model_dir(args.model)), args.model
        else:
            from tools.presets import build_preset

            preset = args.preset or "mid"
            bar.set_postfix_str(f"building the {preset} preset")
            model_dir = build_preset(preset, Path(tmp) / preset, dtype=args.preset_dtype)
            stored = json.loads((model_dir / "config.json").read_text()).get("torch_dtype", "float32")
            name = f"preset {preset} (random weights, {stored})"
        bar.update()
        bar.set_postfix_str("memory bandwidth")
        machine = dict(description=machine_description())
        machine.update({k: v for k, v in _run_worker("machine", args, str(model_dir)).items() if k != "runtime"})
        bar.update()
        rows = []
        for runtime in runtimes:
            bar.set_postfix_str(runtime)
            rows.append(_run_worker(runtime, args, str(model_dir)))
            tqdm.write(json.dumps(rows[-1]), file=sys.stderr)  # each result as it comes: none lost to a later crash
            bar.update()
        bar.close()
        profile = checkpoint_profile(model_dir)
    analyse(rows, machine, profile)
    report = dict(
        checkpoint=name,
        settings=dict(
            prompt=args.prompt, max_tokens=args.max_tokens, runs=args.runs, probes=args.probes, skipped=skipped
        ),
        machine=machine,
        parameters=profile,
        runtimes=rows,
        ratios=ratios(rows),
    )
    print(markdown(report))
    if skipped:
        print(f"\nnot installed, skipped: {', '.join(skipped)}")
    if args.json:
        from mlx_paligemma.fsutil import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.chart:
        chart(report, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
