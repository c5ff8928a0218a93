"""Fine-tuning from a bf16 base and from a 4-bit base (QLoRA) on the CPU: the base stays in its dtype,
the loss falls, the saved adapters reproduce the trained model, and `--merge` writes what it says.

Tolerances (measured on these tiny models, logits up to ~8): adapters reloaded vs the in-memory model
max |diff| ~2e-6 (both compute in float32 from the same stored weights; 1e-4 allowed); merged into the
bf16 base ~3e-2 (W + delta rounded to bf16; 0.1 allowed); merged into the 4-bit base, each layer equals
quantize(dequantize(W) + delta) exactly, and re-quantizing moves this tiny 4-bit model's logits by up to
~1.1 (mean ~0.03; mean < 0.1 allowed); merged with --merge-dtype float32 ~3e-6 (1e-4 allowed).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma import finetune as ft
from mlx_paligemma.checkpoint import open_checkpoint, stored_dtype
from mlx_paligemma.quantize import quantize
from tests.helpers import noise_image
from tests.test_finetune import _write_data

STEPS = 12


@pytest.fixture(scope="module")
def bases(pg1_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qlora")
    bf16 = quantize(pg1_dir, root / "bf16", dtype="bfloat16", progress=lambda _: None)  # a bf16 conversion
    q4 = quantize(bf16, root / "q4", bits=4, group_size=32, progress=lambda _: None)
    return {"bfloat16": bf16, "4bit": q4, "data": _write_data(root / "data")}


def _train(bases, base, out, **kw):
    """Train; returns (result, logits of the trained in-memory model on a fixed batch, its parameters)."""
    seen = {}

    def grab(step, model, processor, info):
        if step == kw.get("max_steps", STEPS):
            batch = processor([noise_image(40, 40, seed=9)], ["caption en"])
            seen["logits"] = np.array(model(**batch))
            seen["batch"] = batch
            seen["q_proj"] = dict(model.language_model.layers[0].self_attn.q_proj.linear)  # before --merge folds it
            seen["lora_dtypes"] = {m.lora_a.dtype for _, m in model.named_modules() if hasattr(m, "lora_a")}

    opts = ft.FinetuneOptions(
        model=str(bases[base]),
        data=str(bases["data"]),
        out=str(out),
        batch_size=8,  # the whole data set: every step sees the same batch, so its loss must fall
        seed=0,
        quiet=True,
        lora_rank=8,
        lora_layers="all",
        lr=5e-3,
        **{"max_steps": STEPS, **kw},
    )
    return ft.finetune(opts, callback=grab), seen


@pytest.mark.parametrize("base", ["bfloat16", "4bit"])
def test_lora_on_a_bf16_or_4bit_base(bases, base, tmp_path):
    result, seen = _train(bases, base, tmp_path / "out", merge=True)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0], losses

    base_layer = seen["q_proj"]  # the frozen base stays bf16 (or 4-bit) in memory, on the CPU too
    assert base_layer["weight"].dtype == (mx.uint32 if base == "4bit" else mx.bfloat16)
    assert seen["lora_dtypes"] == {mx.float32}

    reloaded, _ = mp.load(bases[base], adapter_path=result.out)
    np.testing.assert_allclose(np.array(reloaded(**seen["batch"])), seen["logits"], rtol=0, atol=1e-4)

    merged_dir = result.out / "merged"
    merged, _ = mp.load(merged_dir)
    merged_logits = np.array(merged(**seen["batch"]))
    assert stored_dtype(open_checkpoint(merged_dir)) == "bfloat16"  # the base's dtype, not float32
    config = json.loads((merged_dir / "config.json").read_text())
    if base == "4bit":  # each adapted layer is W + delta quantized again with the base's own settings
        assert config["quantization"]["bits"] == 4
        layer = reloaded.language_model.layers[0].self_attn.q_proj
        w = mx.dequantize(layer.linear.weight, layer.linear.scales, layer.linear.biases, 32, 4)
        expected = mx.quantize(w + (layer.scale * (layer.lora_a @ layer.lora_b)).T.astype(w.dtype), 32, 4)
        got = merged.language_model.layers[0].self_attn.q_proj
        for name, array in zip(("weight", "scales", "biases"), expected):  # scales and biases written in bf16
            array = array.astype(mx.bfloat16).astype(mx.float32) if name != "weight" else array
            np.testing.assert_array_equal(np.array(got[name]), np.array(array), err_msg=name)
        assert np.abs(merged_logits - seen["logits"]).mean() < 0.1
    else:
        assert "quantization" not in config
        np.testing.assert_allclose(merged_logits, seen["logits"], rtol=0, atol=0.1)


def test_merge_dtype_writes_a_float_checkpoint_from_a_quantized_base(bases, tmp_path):
    result, seen = _train(bases, "4bit", tmp_path / "out", merge=True, merge_dtype="float32", max_steps=2)
    merged_dir = result.out / "merged"
    assert "quantization" not in json.loads((merged_dir / "config.json").read_text())
    assert stored_dtype(open_checkpoint(merged_dir)) == "float32"
    merged, _ = mp.load(merged_dir)
    assert "scales" not in merged.language_model.layers[0].self_attn.q_proj
    np.testing.assert_allclose(np.array(merged(**seen["batch"])), seen["logits"], rtol=0, atol=1e-4)
