"""Side-by-side generation benchmark: MLX vs the PyTorch reference backend on one checkpoint.

    python benchmarks/bench_generate.py --model google/paligemma-3b-mix-224 --image cat.jpg
    python benchmarks/bench_generate.py --preset tiny          # a random checkpoint built on the fly

Each backend runs in its own process (clean peak-memory figures, no shared thread pools) and
repeats the same greedy generation; the table shows the median run. On Linux, MLX's CPU wheel
links the reference BLAS (~3 GFLOP/s): this script preloads Intel MKL (`pip install mkl`) or
OpenBLAS when one is installed, as a Linux user would, and says which it used.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def preload_fast_blas() -> str:
    """Load an optimised BLAS before mlx.core so MLX's CPU matmuls use it (Linux only)."""
    if sys.platform != "linux":
        return "platform default"
    patterns = [os.path.join(sys.prefix, "lib", "libmkl_rt.so*"), "/usr/lib/x86_64-linux-gnu/libopenblas*.so*"]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return os.path.basename(path)
            except OSError:
                continue
    return "reference BLAS (slow: pip install mkl)"


def worker(args: argparse.Namespace) -> None:
    """One backend, several runs; prints one JSON line."""
    blas = preload_fast_blas() if args.backend == "mlx" else "torch's own"
    import numpy as np
    from PIL import Image

    import mlx_paligemma as mp

    tic = time.perf_counter()
    if args.backend == "mlx":
        import mlx.core as mx

        model, processor = mp.load(args.model, dtype=args.dtype)
        device = f"mlx {mx.default_device()}"
    else:
        from mlx_paligemma import reference

        model, processor = reference.load(args.model, device=args.device, dtype=args.dtype)
        device = f"torch {model.device}"
    load_time = time.perf_counter() - tic
    image = (
        Image.open(args.image)
        if args.image
        else Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    )
    mp.generate(model, processor, image, args.prompt, max_tokens=4)  # warm-up
    runs = [
        mp.generate(model, processor, image, args.prompt, max_tokens=args.max_tokens).stats for _ in range(args.runs)
    ]
    median = lambda attr: statistics.median(getattr(s, attr) for s in runs)  # noqa: E731
    print(
        json.dumps(
            dict(
                backend=args.backend,
                device=device,
                blas=blas,
                dtype=str(getattr(model, "dtype", args.dtype)),
                load_s=load_time,
                vision_s=median("vision_time"),
                prompt_tokens=runs[0].prompt_tokens,
                prefill_tps=median("prefill_tps"),
                generated=runs[0].generation_tokens,
                decode_tps=median("generation_tps"),
                peak_gb=max(s.peak_memory_gb for s in runs),
            )
        )
    )


# A mid-size PaliGemma 2 (~0.6 B parameters): a SigLIP-B-like tower at 224 px (256 image tokens) and a
# narrow Gemma 2 decoder with the real 257216-entry vocabulary, so the LM head costs what it really does.
MID_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
MID_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=128,
    query_pre_attn_scalar=128,
    sliding_window=4096,
)
REAL_VOCAB = 257216


def build_preset(name: str, directory: Path) -> Path:
    """A random checkpoint built with the project's tool (tiny) or its building blocks (mid)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_tiny_checkpoint as tool

    if name == "tiny":
        return tool.make_tiny_checkpoint(directory / "tiny", version=2, weight_scale=0.5, seed=7)
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    out = directory / "mid"
    out.mkdir()
    image_token_index = tool._write_processor(out, 224, 256)
    config = tool._build_config(2, 224, None, image_token_index, "bfloat16")
    config.text_config.update(dict(MID_TEXT, vocab_size=REAL_VOCAB))
    config.text_config.layer_types = [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(MID_TEXT["num_hidden_layers"])
    ]
    config.vision_config.update(MID_VISION)
    config.projection_dim = config.vision_config.projection_dim = MID_TEXT["hidden_size"]
    config.vocab_size = REAL_VOCAB
    model = PaliGemmaForConditionalGeneration(config)
    tool._randomize(model, 0, 0.5)
    tool._write_weights(out, tool._stored_tensors(model, "hub", torch.bfloat16), 1)
    config.save_pretrained(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory or hub id")
    p.add_argument("--preset", choices=["tiny", "mid"], help="build a random checkpoint instead of --model")
    p.add_argument("--image", help="image file (default: random noise 640x480)")
    p.add_argument("--prompt", default="caption en")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtype", default=None, help="compute dtype for both backends (default: checkpoint's)")
    p.add_argument("--device", default=None, help="torch device (default: best available)")
    p.add_argument("--backends", default="mlx,torch")
    p.add_argument("--backend", help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.backend:
        worker(args)
        return 0
    if bool(args.model) == bool(args.preset):
        p.error("give exactly one of --model and --preset")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_preset(args.preset, Path(tmp)))
        rows = []
        for backend in args.backends.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--backend",
                backend,
                "--model",
                model,
                "--prompt",
                args.prompt,
                "--max-tokens",
                str(args.max_tokens),
                "--runs",
                str(args.runs),
            ]
            for flag, value in (("--image", args.image), ("--dtype", args.dtype), ("--device", args.device)):
                if value:
                    cmd += [flag, value]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"model: {args.model or args.preset + ' (random)'} | prompt: {args.prompt!r} | "
        f"{rows[0]['prompt_tokens']} prompt tokens, up to {args.max_tokens} new, median of {args.runs}"
    )
    print("| backend | device | dtype | BLAS | load s | vision s | prefill tok/s | decode tok/s | peak GB |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['backend']} | {r['device']} | {r['dtype']} | {r['blas']} | {r['load_s']:.2f} | "
            f"{r['vision_s']:.3f} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['peak_gb']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
