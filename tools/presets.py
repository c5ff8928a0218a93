"""Random checkpoints of real PaliGemma sizes, for benchmarks and memory estimates (no download).

The specs below are the exact shapes of the released models (config.json of google/paligemma-3b-pt-224
and google/paligemma2-{3b,10b,28b}-pt-224); the weights are random. `build_preset` writes one tensor by
tensor into shards, so memory stays at about one shard whatever the model's size:

    python -m tools.presets mid OUT_DIR                       # SigLIP-B + Gemma 1024 x 8, 1.9 GB float32
    python -m tools.presets 3b OUT_DIR                        # paligemma-3b-pt-224, 5.9 GB bf16
    python -m tools.presets 3b-pg2 OUT_DIR --image-size 448   # paligemma2-3b-pt-448's shapes
    python -m tools.presets tiny-pg2 OUT_DIR                  # the tests' tiny PaliGemma 2

The tiny tokenizer of tools/make_tiny_checkpoint.py is reused: ids past its vocabulary are unused
embedding rows, and `image_token_index` is the tiny tokenizer's `<image>` id (not the real 257152), so
transformers' and mlx-vlm's processors, which take it from the tokenizer, agree with ours.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch

from tools.make_tiny_checkpoint import (
    BOS_ID,
    DTYPES,
    EOS_ID,
    PAD_ID,
    _build_atomically,
    _resolve_options,
    _write_json,
    write_processor_files,
)

# SigLIP So400m/14, the vision tower of every released PaliGemma 1 and 2.
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
REAL_VOCAB = 257216  # 257152 tokens padded to a multiple of 64

PALIGEMMA_3B = dict(
    name="paligemma-3b-pt-224",
    vision=SO400M,
    text=dict(
        model_type="gemma",
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=REAL_VOCAB,
    ),
    image_token_index=257152,  # the real model's; the random checkpoints use their tokenizer's instead
)
# The issue-9 benchmark's mid size: a SigLIP-B-sized tower at 224 px (256 image tokens) and a narrow Gemma 1
# decoder (width 1024, 8 layers, multi-query attention as in the 3B) with the real 257216-entry vocabulary, so
# the LM head costs what it really does: 385 M decoder parameters, 470 M in all (1.9 GB in float32).
PALIGEMMA_MID = dict(
    name="mid (SigLIP-B/14 224 px + Gemma 1024 x 8)",
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=14),
    text=dict(
        model_type="gemma",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=REAL_VOCAB,
    ),
    image_token_index=257152,
)
# Gemma 2 fields shared by the three PaliGemma 2 decoders (Gemma 2 2B, 9B and 27B).
_GEMMA2 = dict(
    model_type="gemma2",
    vocab_size=REAL_VOCAB,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    hidden_activation="gelu_pytorch_tanh",
)
PALIGEMMA2_3B = dict(
    name="paligemma2-3b-pt-224",
    vision=SO400M,
    text=dict(
        _GEMMA2,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    image_token_index=257152,
)
PALIGEMMA2_10B = dict(
    name="paligemma2-10b-pt-224",
    vision=SO400M,
    text=dict(
        _GEMMA2,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    image_token_index=257152,
)
PALIGEMMA2_28B = dict(
    name="paligemma2-28b-pt-224",
    vision=SO400M,
    text=dict(
        _GEMMA2,
        hidden_size=4608,
        intermediate_size=36864,
        num_hidden_layers=46,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,  # hidden / heads, not head_dim: the 27B decoder is the odd one out
    ),
    image_token_index=257152,
)
# Every spec by name, buildable or not (10b-pg2 and 28b-pg2 are 20 and 56 GB in bf16).
SPECS = {
    "mid": PALIGEMMA_MID,
    "3b": PALIGEMMA_3B,
    "3b-pg2": PALIGEMMA2_3B,
    "10b-pg2": PALIGEMMA2_10B,
    "28b-pg2": PALIGEMMA2_28B,
}
TINY_VERSIONS = {"tiny": 1, "tiny-pg2": 2}  # built by make_tiny_checkpoint (its own tiny shapes)
PRESETS = ("tiny", "tiny-pg2", "mid", "3b", "3b-pg2")
PRESET_DTYPES = {"tiny": "float32", "tiny-pg2": "float32", "mid": "float32", "3b": "bfloat16", "3b-pg2": "bfloat16"}


def spec_shapes(spec: dict, image_size: int = 224) -> dict[str, tuple[int, ...]]:
    """Every tensor of the spec's checkpoint in the hub layout (google/paligemma*), by name."""
    v, t = spec["vision"], spec["text"]
    d, p = v["hidden_size"], v["patch_size"]
    shapes = {
        "vision_tower.vision_model.embeddings.patch_embedding.weight": (d, 3, p, p),
        "vision_tower.vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_tower.vision_model.embeddings.position_embedding.weight": ((image_size // p) ** 2, d),
        "vision_tower.vision_model.post_layernorm.weight": (d,),
        "vision_tower.vision_model.post_layernorm.bias": (d,),
        "multi_modal_projector.linear.weight": (t["hidden_size"], d),
        "multi_modal_projector.linear.bias": (t["hidden_size"],),
        "language_model.model.embed_tokens.weight": (t["vocab_size"], t["hidden_size"]),
        "language_model.model.norm.weight": (t["hidden_size"],),
    }
    for i in range(v["num_hidden_layers"]):
        pre = f"vision_tower.vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}self_attn.{proj}.weight"], shapes[f"{pre}self_attn.{proj}.bias"] = (d, d), (d,)
        shapes[f"{pre}mlp.fc1.weight"], shapes[f"{pre}mlp.fc1.bias"] = (
            (v["intermediate_size"], d),
            (v["intermediate_size"],),
        )
        shapes[f"{pre}mlp.fc2.weight"], shapes[f"{pre}mlp.fc2.bias"] = (d, v["intermediate_size"]), (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{norm}.weight"], shapes[f"{pre}{norm}.bias"] = (d,), (d,)
    h, q, kv = t["hidden_size"], t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if t["model_type"] == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(t["num_hidden_layers"]):
        pre = f"language_model.model.layers.{i}."
        shapes.update(
            {
                f"{pre}self_attn.q_proj.weight": (q, h),
                f"{pre}self_attn.k_proj.weight": (kv, h),
                f"{pre}self_attn.v_proj.weight": (kv, h),
                f"{pre}self_attn.o_proj.weight": (h, q),
                f"{pre}mlp.gate_proj.weight": (t["intermediate_size"], h),
                f"{pre}mlp.up_proj.weight": (t["intermediate_size"], h),
                f"{pre}mlp.down_proj.weight": (h, t["intermediate_size"]),
            }
        )
        shapes.update({f"{pre}{norm}.weight": (h,) for norm in norms})
    return shapes


def spec_config(spec: dict, image_size: int, dtype: str, image_token_index: int) -> dict:
    """config.json in the hub's style for the spec (sparse, as google/paligemma* ship it)."""
    v, t = spec["vision"], spec["text"]
    num_image_tokens = (image_size // v["patch_size"]) ** 2
    text_config = {k: t[k] for k in sorted(t) if not (k == "head_dim" and t[k] == 256)}  # 256: Gemma's default
    text_config.update(num_image_tokens=num_image_tokens, torch_dtype=dtype)
    vision_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size")
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_size": t["hidden_size"],
        "ignore_index": -100,
        "image_token_index": image_token_index,
        "model_type": "paligemma",
        "pad_token_id": PAD_ID,
        "projection_dim": t["hidden_size"],
        "text_config": dict(sorted(text_config.items())),
        "torch_dtype": dtype,
        "transformers_version": "4.41.0.dev0" if t["model_type"] == "gemma" else "4.47.0.dev0",
        "vision_config": {
            **{k: v[k] for k in vision_keys},
            "image_size": image_size,
            "model_type": "siglip_vision_model",
            "num_image_tokens": num_image_tokens,
            "projection_dim": t["hidden_size"],
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        },
    }


def random_tensor(name: str, shape: tuple[int, ...], dtype: str, generator: torch.Generator) -> torch.Tensor:
    """Weights scaled by 1/sqrt(fan-in); SigLIP LayerNorm weights around 1, biases and Gemma's (1 + w) norms
    around 0, so activations stay in a realistic range through every layer."""
    if len(shape) == 1:
        is_layer_norm = name.startswith("vision_tower.") and "norm" in name and name.endswith(".weight")
        mean = 1.0 if is_layer_norm else 0.0
        return (torch.randn(shape, generator=generator) * 0.1 + mean).to(DTYPES[dtype])
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=generator) / math.sqrt(fan_in)).to(DTYPES[dtype])


def make_spec_checkpoint(
    out_dir,
    spec: dict,
    dtype: str = "bfloat16",
    seed: int = 0,
    image_size: int = 224,
    *,
    shard_bytes: int = 2 * 1024**3,
    replace: bool = False,
) -> Path:
    """A random checkpoint with the spec's exact shapes, written tensor by tensor into shards of at most
    `shard_bytes` (memory stays at about one shard), in a sibling temp dir renamed into place at the end
    (an interrupted build leaves nothing to mistake for a checkpoint)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise FileExistsError(f"{out_dir} exists and is not empty")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if image_size % spec["vision"]["patch_size"]:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {spec['vision']['patch_size']}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        _write_spec_checkpoint(tmp, spec, dtype, seed, image_size, shard_bytes)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_spec_checkpoint(out_dir: Path, spec: dict, dtype: str, seed: int, image_size: int, shard_bytes: int):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shapes = spec_shapes(spec, image_size)
    image_token_index = write_processor_files(out_dir, image_size, (image_size // spec["vision"]["patch_size"]) ** 2)
    shards: list[list[str]] = [[]]
    size = 0
    itemsize = torch.finfo(DTYPES[dtype]).bits // 8
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for index, names in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], dtype, generator) for name in names}
        save_file(tensors, out_dir / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out_dir / "config.json", spec_config(spec, image_size, dtype, image_token_index))


def build_preset(
    name: str, out_dir, dtype: str | None = None, seed: int = 0, *, image_size: int | None = None, replace: bool = False
) -> Path:
    """A random checkpoint of a named size: "tiny"/"tiny-pg2" (the tests' PaliGemma 1/2, a few hundred kB),
    "mid" (`PALIGEMMA_MID`, 1.9 GB in float32), "3b" (paligemma-3b-pt-224's exact shapes, 5.9 GB in bf16) or
    "3b-pg2" (paligemma2-3b-pt-224's, 6.1 GB in bf16). Default dtypes: float32 for tiny and mid, bfloat16 (as
    the real models ship) for the others. `image_size` 448 or 896 gives the -448/-896 models' shapes. Returns
    the absolute path."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    dtype = dtype or PRESET_DTYPES[name]
    if name in TINY_VERSIONS:
        options = _resolve_options(
            version=TINY_VERSIONS[name],
            layout="hub",
            shards=1,
            image_size=image_size or 56,
            sliding_window=None,
            sparse_config=None,
            dtype=dtype,
            seed=seed,
            weight_scale=1.0,
        )
        return _build_atomically(Path(out_dir), replace, options)
    return make_spec_checkpoint(
        out_dir, SPECS[name], dtype=dtype, seed=seed, image_size=image_size or 224, replace=replace
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.presets", description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 (tiny, mid), bfloat16")
    parser.add_argument("--image-size", type=int, default=None, help="224 (448, 896: the larger models' shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dtype = args.dtype or PRESET_DTYPES[args.preset]
    try:
        out_dir = build_preset(
            args.preset, args.out_dir, dtype=dtype, seed=args.seed, image_size=args.image_size, replace=args.force
        )
    except FileExistsError as error:
        hint = " (use --force to replace it)" if args.out_dir.is_dir() else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) / 1e9
    name = SPECS[args.preset]["name"] if args.preset in SPECS else f"tiny PaliGemma {TINY_VERSIONS[args.preset]}"
    print(out_dir)
    print(
        f"{name} shapes, random weights, {dtype}, {size:.2f} GB, seed {args.seed}, "
        f"built in {time.perf_counter() - start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
