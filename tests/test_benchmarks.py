"""The benchmark runs (tiny preset, MLX + torch), the presets have their shapes, and the decode hot path
(no mask built when nothing is masked) gives the logits of a full forward pass."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from tests.helpers import noise_image
from tools.make_tiny_checkpoint import make_tiny_checkpoint, verify_transformers_load
from tools.presets import (
    PALIGEMMA2_3B,
    PALIGEMMA2_10B,
    PALIGEMMA2_28B,
    PALIGEMMA_3B,
    PALIGEMMA_MID,
    make_spec_checkpoint,
    spec_shapes,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_MKL = sys.platform == "linux" and platform.machine() == "x86_64"


def test_compare_backends_on_the_tiny_preset(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.compare_backends", "--preset", "tiny", "--runtimes", "mlx,torch"]
    cmd += ["--runs", "1", "--max-tokens", "3", "--probes", "small", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    rows = {r["runtime"]: r for r in report["runtimes"]}
    assert set(rows) == {"mlx", "torch"} and not any("error" in r for r in rows.values()), rows
    tiny_prompt = 16 + 1 + 3  # 16 image tokens (56 px / 14), <bos>, "caption en\n"
    for r in rows.values():
        assert r["generated"] == 4 and r["prompt_tokens"] >= tiny_prompt  # EOS ignored: exactly max_tokens + 1
        assert r["decode_tps"] > 0 and r["ttft_s"] > r["vision_s"] > 0 and r["load_s"] > 0 and r["peak_rss_gb"] > 0
        assert r["gemm_gflops"] > 0 and r["gemv_gbps"] > 0 and 0 < r["decode_of_bound"] and r["prefill_of_gemm"] > 0
    assert rows["mlx"]["dtype"] == "float32" and rows["torch"]["dtype"] == "bfloat16"
    if HAS_MKL:
        assert rows["mlx"]["blas"] == "mkl"
    assert report["machine"]["memory_read_gbps"] > 0 and report["parameters"]["image_tokens"] == 16
    assert report["settings"] == dict(prompt="caption en", max_tokens=3, runs=1, probes="small", skipped=[])
    assert "mlx decode vs torch" in report["ratios"]
    assert "| mlx | float32 |" in run.stdout and "| torch | bfloat16 |" in run.stdout  # the markdown table


def test_unknown_runtime_is_a_one_line_error():
    cmd = [sys.executable, "-m", "benchmarks.compare_backends", "--runtimes", "mlx,tensorflow"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "unknown tensorflow" in run.stderr


def test_preset_shapes():
    """mid is the issue's shape (385 M decoder parameters). 3b is paligemma-3b-pt-224: 2.92 B in all (keras-hub's
    2,923,335,408 counts 257152 embedding rows, the checkpoint pads them to 257216). The PaliGemma 2 sizes
    have the published parameter counts (3.0 B, 9.7 B, 27.7 B; the model cards round them to 3, 10, 28)."""
    mid = spec_shapes(PALIGEMMA_MID, 224)
    decoder = sum(math.prod(s) for k, s in mid.items() if k.startswith("language_model."))
    assert round(decoder / 1e6) == 385
    assert mid["vision_tower.vision_model.embeddings.position_embedding.weight"] == (256, 768)
    full = spec_shapes(PALIGEMMA_3B, 224)
    assert sum(math.prod(s) for s in full.values()) == 2_923_335_408 + 64 * 2048
    assert spec_shapes(PALIGEMMA_3B, 448)["vision_tower.vision_model.embeddings.position_embedding.weight"] == (
        1024,
        1152,
    )
    billions = {
        name: round(sum(math.prod(s) for s in spec_shapes(spec, 224).values()) / 1e8) / 10
        for name, spec in (("3b", PALIGEMMA2_3B), ("10b", PALIGEMMA2_10B), ("28b", PALIGEMMA2_28B))
    }
    assert billions == {"3b": 3.0, "10b": 9.7, "28b": 27.7}, billions


@pytest.mark.parametrize("spec", [PALIGEMMA_3B, PALIGEMMA2_28B], ids=["gemma", "gemma2"])
def test_preset_writer_makes_checkpoints_both_loaders_read(tmp_path, spec):
    """The presets' writer, on a spec shrunk to test size (its model type and Gemma 2 fields kept): transformers
    loads every stored tensor unchanged, and this package's loader builds the same decoder kind from it."""
    small = dict(
        spec,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14),
        text=dict(spec["text"], hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4),
    )
    small["text"].update(num_key_value_heads=2, head_dim=16, vocab_size=1344)
    if spec["text"]["model_type"] == "gemma2":
        small["text"].update(query_pre_attn_scalar=12, sliding_window=8)
    out = make_spec_checkpoint(tmp_path / "ckpt", small, dtype="float32", image_size=56)
    verify_transformers_load(out)
    model, _ = mp.load(out)
    text = model.config.text_config
    assert text.model_type == spec["text"]["model_type"] and text.num_hidden_layers == 3
    if text.is_gemma2:
        assert (text.query_pre_attn_scalar, text.sliding_window, text.final_logit_softcapping) == (12, 8, 30.0)


def test_preset_cli_refuses_a_non_empty_folder(tmp_path):
    """One line and exit 2, and the user's file is still there."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    cmd = [sys.executable, "-m", "tools.presets", "3b", str(tmp_path / "full")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "exists and is not empty" in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "full" / "x").read_text() == "mine"


@pytest.mark.parametrize("window", [8, 64])
def test_decode_steps_match_a_full_forward(tmp_path, window):
    """Cached decode (masks skipped while nothing is masked: window 64 > the sequence; with window 8 the
    sliding layers still build theirs) against one prefix-LM forward pass over prefix + suffix."""
    ckpt = make_tiny_checkpoint(tmp_path / "pg2", version=2, sliding_window=window, seed=3)
    model, processor = mp.load(ckpt)
    batch = processor.encode_prompts(["caption en"])
    pixels = mx.array(processor.preprocess_image(noise_image(60, 50))[None])
    features = model.encode_image(pixels)
    cache = model.make_cache(mx.array(batch["attention_mask"]))
    logits = [model.prefill(mx.array(batch["input_ids"]), features, cache)]
    tokens = []
    for _ in range(6):
        tokens.append(int(mx.argmax(logits[-1], axis=-1).item()))
        logits.append(model.decode_step(mx.array([tokens[-1]], mx.int32), cache))
    prefix = batch["input_ids"].shape[1]
    ids = np.concatenate([batch["input_ids"], np.array([tokens], np.int32)], axis=1)
    types = np.concatenate([np.zeros((1, prefix), np.int32), np.ones((1, len(tokens)), np.int32)], axis=1)
    full = model(ids, pixels, token_type_ids=types)
    want = np.asarray(full[0, prefix - 1 :])
    got = np.concatenate([np.asarray(x) for x in logits], axis=0)
    assert np.abs(got - want).max() <= 1e-4
