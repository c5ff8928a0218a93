"""The 4-bit presets (10b-pg2-4bit, 28b-pg2-4bit) are written as `mlx-paligemma quantize --bits 4` writes the
float checkpoint of the same shapes: same tensors, shapes and dtypes; checked on a small spec of the same kind."""

from __future__ import annotations

import json

import mlx.core as mx
from mlx.utils import tree_flatten

import mlx_paligemma as mp
from mlx_paligemma.checkpoint import canonical_key
from mlx_paligemma.load import load_model
from mlx_paligemma.quantize import quantize
from tests.helpers import noise_image
from tools.presets import PALIGEMMA2_10B, make_quantized_spec_checkpoint, make_spec_checkpoint

# PaliGemma 2 10B's kind (Gemma 2, 2:1 grouped KV heads, SigLIP), small enough to build in a second.
SMALL = dict(
    PALIGEMMA2_10B,
    name="small",
    vision=dict(PALIGEMMA2_10B["vision"], hidden_size=64, intermediate_size=128, num_hidden_layers=2),
    text=dict(
        PALIGEMMA2_10B["text"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1856,
    ),
)


def stored(directory) -> dict:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update({canonical_key(k): (tuple(v.shape), v.dtype) for k, v in mx.load(str(f)).items()})
    return tensors


def test_the_4bit_preset_writer_matches_quantizing_the_float_checkpoint(tmp_path):
    built = make_quantized_spec_checkpoint(tmp_path / "direct", SMALL, bits=4, group_size=64, shard_bytes=100_000)
    float_dir = make_spec_checkpoint(tmp_path / "float", SMALL, dtype="bfloat16")
    reference = quantize(float_dir, tmp_path / "quantized", bits=4, group_size=64, progress=lambda message: None)

    assert set(stored(built)) == set(stored(reference))  # the same tensors, quantized ones with scales and biases
    loaded = [
        {k: (v.shape, v.dtype) for k, v in tree_flatten(load_model(d, lazy=True).parameters())}
        for d in (built, reference)
    ]
    assert loaded[0] == loaded[1]  # and the same shapes and dtypes (the patch conv is stored as the hub stores it)
    assert len(list(built.glob("*.safetensors"))) > 1  # shards, with an index naming every tensor
    index = json.loads((built / "model.safetensors.index.json").read_text())["weight_map"]
    assert {canonical_key(k) for k in index} == set(stored(built))
    assert json.loads((built / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4}
    model, processor = mp.load(built)  # strict: every tensor in place
    assert len(mp.generate(model, processor, noise_image(60, 40), "caption en", max_tokens=3).token_ids) == 3
