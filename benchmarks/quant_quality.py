"""Quality of each quantization recipe: the demo model's eval_shapes scores, and the mean KL divergence
of next-token distributions from float32 on a preset (default mid, the real 257k vocabulary).

    python -m benchmarks.quant_quality --workdir /tmp/qq
    python -m benchmarks.quant_quality --workdir /tmp/qq --images 40 --kl-preset tiny    # a quick check

Variants: float32 (the reference), 8bit, 6bit, 4bit, 3bit and the mixed recipes (mlx-paligemma quantize
--bits / --recipe, group size 64 where the widths allow, else 32). KL: `--rows` noise images with
"caption en" and a fixed answer, the distributions at the last `--positions` positions (prompt end and
answer), KL(float32 || quantized) averaged over them, in nats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VARIANTS = ("float32", "8bit", "6bit", "4bit", "3bit", "mixed_4_8", "mixed_4_6", "mixed_3_6")


def _quantized(src: Path, workdir: Path, variant: str, group_size: int) -> Path:
    from mlx_paligemma.quantize import quantize

    if variant == "float32":
        return src
    out = workdir / f"{src.name}-{variant}"
    if not (out / "config.json").exists():
        bits = int(variant[: -len("bit")]) if variant.endswith("bit") else None
        recipe = None if bits else variant
        quantize(src, out, bits=bits, recipe=recipe, group_size=group_size, force=True, progress=lambda _: None)
    return out


def _next_token_logprobs(model_dir: Path, rows: int, positions: int):
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    import mlx_paligemma as mp
    from mlx_paligemma.finetune import forward

    model, processor = mp.load(model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(rows)]
    batch = processor(images, ["caption en"] * rows, ["a red square next to a blue circle"] * rows)
    logits = forward(model, {k: mx.array(v) for k, v in batch.items()}, positions).astype(mx.float32)
    out = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    del model
    mx.clear_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--images", type=int, default=200, help="eval_shapes scenes for the demo model")
    p.add_argument("--kl-preset", default="mid", help="tools/presets.py preset for the KL column")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    import numpy as np

    from benchmarks.eval_shapes import evaluate
    from mlx_paligemma import load
    from mlx_paligemma.checkpoint import resolve_model_dir
    from tools.presets import build_preset

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    demo = workdir / "demo"
    if not demo.exists():  # a writable copy: quantize refuses outputs inside the package
        import shutil

        shutil.copytree(resolve_model_dir("demo"), demo)
    preset = workdir / args.kl_preset
    if not (preset / "config.json").exists():
        build_preset(args.kl_preset, preset, dtype="float32", replace=True)
    group = 32 if args.kl_preset.startswith("tiny") else 64

    reference = _next_token_logprobs(preset, args.rows, args.positions)
    rows = []
    print(f"{'variant':<11}{'caption':>9}{'count':>8}{'colour':>8}{'det mIoU':>10}{'absent':>8}{'KL (nats)':>11}")
    for variant in args.variants.split(","):
        model, processor = load(_quantized(demo, workdir, variant, 64))
        scores = evaluate(model, processor, args.images)
        del model
        logp = _next_token_logprobs(_quantized(preset, workdir, variant, group), args.rows, args.positions)
        kl = float(np.mean(np.sum(np.exp(reference) * (reference - logp), axis=-1)))
        row = {"variant": variant, "kl": kl, **scores}
        rows.append(row)
        print(
            f"{variant:<11}{scores['caption_exact']:>9.3f}{scores['counting']:>8.3f}{scores['colour']:>8.3f}"
            f"{scores['detection_miou']:>10.3f}{scores['absent_empty']:>8.3f}{kl:>11.5f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
