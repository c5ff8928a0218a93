"""What each rank holds when a PaliGemma preset is split with `mp.load(shard=True)`: bytes per rank.

    mlx.launch -n 2 --backend ring --python "$(which python)" -m benchmarks.shard_memory 10b-pg2 28b-pg2 --bits 4

Nothing is computed or read: the model is built from the preset's exact shapes with lazy parameters,
quantized and sharded exactly as loading a checkpoint would (`sharding.shard_model`), and the bytes of
the arrays each rank would keep are summed. Run alone (no launch) it gives the single-process bytes.
Rank 0 prints one markdown row per preset. Weights only: the KV cache and activations come on top.
"""

# ruff: noqa: I001  (mlx_paligemma is imported before mlx.core on purpose: it preloads the fast BLAS)
from __future__ import annotations

import argparse
import sys

import mlx_paligemma  # noqa: F401  (first: the BLAS is chosen before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_paligemma.config import PaliGemmaConfig
from mlx_paligemma.dtypes import mlx_dtypes
from mlx_paligemma.models import Model
from mlx_paligemma.quantize import quantizable
from mlx_paligemma.sharding import shard_model
from tools.presets import SPECS, spec_config


def held_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def lazy_model(spec: dict, dtype: str, bits: int | None, group_size: int, image_size: int) -> Model:
    """The preset's model with unevaluated parameters (nothing is allocated until evaluated)."""
    model = Model(PaliGemmaConfig.from_dict(spec_config(spec, image_size, dtype, spec["image_token_index"])))
    model.set_dtype(mlx_dtypes()[dtype])
    if bits:
        nn.quantize(model, group_size, bits, class_predicate=lambda p, m: quantizable(p, m, group_size, False))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shard_memory", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+", choices=sorted(SPECS))
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None, help="quantized as mlx-paligemma quantize")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="of the float weights (default bfloat16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shard-vision", action="store_true")
    args = parser.parse_args(argv)
    group = mx.distributed.init()
    for name in args.presets:
        model = lazy_model(SPECS[name], args.dtype, args.bits, args.group_size, args.image_size)
        whole_lm = held_bytes(model.language_model)
        shard_model(model, group, shard_vision=args.shard_vision)
        mine = [held_bytes(model.language_model), held_bytes(model) - held_bytes(model.language_model)]
        every = (
            mx.distributed.all_gather(mx.array([mine], mx.float32), group=group).tolist()
            if group.size() > 1
            else [mine]
        )
        if group.rank() == 0:
            weights = f"{args.bits}-bit g{args.group_size}" if args.bits else args.dtype
            lm = max(r[0] for r in every) / 1e9
            rest = max(r[1] for r in every) / 1e9
            print(
                f"| {SPECS[name]['name']} | {weights} | {group.size()} | {whole_lm / 1e9:.2f} | {lm:.2f} | "
                f"{rest:.2f} | {lm + rest:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
