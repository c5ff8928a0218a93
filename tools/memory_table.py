"""Print the README's memory table: PaliGemma 2 3B/10B/28B at 224/448/896 px, generating and LoRA
fine-tuning, from a bf16, 8-bit or 4-bit checkpoint, as `mlx_paligemma.memory` estimates them on a
Mac's GPU (bf16 compute), and which Macs they fit.

    python -m tools.memory_table            # markdown, GB
    python -m tools.memory_table --tokens 64 --max-tokens 200 --batch 2
"""

from __future__ import annotations

import argparse
from typing import Optional

from mlx_paligemma.config import PaliGemmaConfig
from mlx_paligemma.memory import estimate
from tools.presets import PALIGEMMA2_3B, PALIGEMMA2_10B, PALIGEMMA2_28B, spec_config

MODELS = {"3B": PALIGEMMA2_3B, "10B": PALIGEMMA2_10B, "28B": PALIGEMMA2_28B}
SIZES = (224, 448, 896)
BASES = {"bf16": None, "8-bit": 8, "4-bit": 4}
# Apple's recommended GPU working set (`max_recommended_working_set_size`) is about 2/3 of the
# memory of 8-32 GB Macs and 3/4 above: what one process can keep resident on the GPU.
MACS = {8: 5.3, 16: 10.7, 32: 21.3, 64: 48.0}


def smallest_mac(total_gb: float) -> str:
    return next((f"{ram} GB" for ram, working_set in MACS.items() if total_gb <= working_set), "> 64 GB")


def row(
    name: str, size: int, base: str, mode: str, tokens: int, max_tokens: int, batch: int
) -> tuple[float, Optional[float]]:
    """(GB, GB with gradient checkpointing or None) for one cell."""
    config = PaliGemmaConfig.from_dict(spec_config(MODELS[name], size, "bfloat16", 257152))
    bits = BASES[base]
    quantization = {"group_size": 64, "bits": bits} if bits else None
    kw = dict(dtype="bfloat16", quantization=quantization, batch=batch, compute_dtype="bfloat16")
    if mode == "generate":
        est = estimate(config, "generate", text_tokens=tokens, max_tokens=max_tokens, **kw)
        return est.total / 1e9, None
    plain = estimate(config, "lora", text_tokens=tokens, **kw)
    ckpt = estimate(config, "lora", text_tokens=tokens, grad_checkpoint=True, **kw)
    return plain.total / 1e9, ckpt.total / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="prompt (+ answer) tokens besides the image's")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens generated")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    print("| model | px | base | generate | LoRA | LoRA, grad. checkpointing | smallest Mac (LoRA) |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        for size in SIZES:
            for base in BASES:
                gen, _ = row(name, size, base, "generate", args.tokens, args.max_tokens, args.batch)
                lora, ckpt = row(name, size, base, "lora", args.tokens, args.max_tokens, args.batch)
                mac = smallest_mac(min(lora, ckpt))
                print(f"| {name} | {size} | {base} | {gen:.1f} GB | {lora:.1f} GB | {ckpt:.1f} GB | {mac} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
