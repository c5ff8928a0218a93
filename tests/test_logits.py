"""MLX logits against transformers' PaliGemmaForConditionalGeneration (the oracle).

Measured on the tiny checkpoints (float32, CPU): max abs difference ~2e-6 for both PaliGemma 1
and 2 with logits of magnitude ~3, so the 1e-4 bound leaves a wide margin yet catches any real
numerical slip (a wrong norm, scale or mask moves logits by >1e-2).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import hf_logits, noise_image

FP32_TOL = 1e-4


def mlx_logits(model, batch) -> np.ndarray:
    out = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    return np.asarray(out.astype(mx.float32))


def as_numpy(batch) -> dict:
    return {k: np.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def loaded(ckpt_dir):
    model, processor = mp.load(ckpt_dir)
    return ckpt_dir, model, processor


def test_single_image_prompt_matches_transformers(loaded):
    ckpt_dir, model, processor = loaded
    batch = processor(images=[noise_image(80, 60)], prompts=["caption en"])
    ours, ref = mlx_logits(model, batch), hf_logits(ckpt_dir, as_numpy(batch))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= FP32_TOL


def test_sequence_is_longer_than_sliding_window(pg2_dir):
    """Makes the PaliGemma 2 comparison meaningful: some keys fall outside the window of 8."""
    _, processor = mp.load(pg2_dir)
    batch = processor(images=[noise_image(32, 32)], prompts=["caption en"])
    assert batch["input_ids"].shape[1] > 8 + processor.num_image_tokens // 2


def test_prompt_with_suffix_matches_transformers(loaded):
    ckpt_dir, model, processor = loaded
    batch = processor(images=[noise_image(64, 64, seed=3)], prompts=["answer en what is this?"],
                      suffixes=["a small grey cat on a mat"])
    types = np.asarray(batch["token_type_ids"])[0]
    assert types[-1] == 1 and types[0] == 0 and types.sum() > 3
    ours, ref = mlx_logits(model, batch), hf_logits(ckpt_dir, as_numpy(batch))
    assert np.abs(ours - ref).max() <= FP32_TOL


def test_batch_rows_equal_single_runs(loaded):
    ckpt_dir, model, processor = loaded
    images = [noise_image(100, 50, seed=1), noise_image(40, 90, "RGB", seed=2)]
    prompts = ["caption en", "answer en how many dogs are sitting on the red sofa?"]
    batch = processor(images=images, prompts=prompts)
    mask = np.asarray(batch["attention_mask"])
    assert mask[0].sum() < mask[1].sum(), "prompts must differ in length so that one row is padded"
    ours = mlx_logits(model, batch)
    ref = hf_logits(ckpt_dir, as_numpy(batch))
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        single = mlx_logits(model, processor(images=[image], prompts=[prompt]))[0]
        valid = mask[row].astype(bool)
        assert np.abs(ours[row][valid] - single).max() <= FP32_TOL
        assert np.abs(ours[row][valid] - ref[row][valid]).max() <= FP32_TOL


def test_image_features_follow_image_tokens_anywhere(loaded):
    """Each row gets its own image's features, wherever its image tokens sit (here: after padding)."""
    ckpt_dir, model, processor = loaded
    images = [noise_image(50, 50, seed=5), noise_image(50, 50, seed=6)]
    swapped = processor(images=images[::-1], prompts=["caption en", "answer en is it?"])
    straight = processor(images=images, prompts=["caption en", "answer en is it?"])
    a, b = mlx_logits(model, straight), mlx_logits(model, swapped)
    assert np.abs(a - b).max() > 1e-3, "swapping the images must change the logits"


def test_numpy_inputs_and_defaults(loaded):
    """Defaults: no padding and everything prefix; numpy arrays accepted."""
    ckpt_dir, model, processor = loaded
    batch = as_numpy(processor(images=[noise_image(30, 30)], prompts=["detect cat"]))
    ours = np.asarray(model(batch["input_ids"], batch["pixel_values"]))
    assert np.abs(ours - hf_logits(ckpt_dir, batch)).max() <= FP32_TOL


def test_bfloat16_agrees_on_top1(loaded, capsys):
    """bf16 compute against the float32 oracle: the argmax must agree on >= 99% of positions."""
    ckpt_dir, _, processor = loaded
    model16, _ = mp.load(ckpt_dir, dtype="bfloat16")
    prompts = ["caption en", "answer en what colour is the car parked near the house?", "detect cat ; dog",
               "describe en", "ocr", "question en a bird"]
    images = [noise_image(40 + 10 * i, 70 - 5 * i, seed=10 + i) for i in range(len(prompts))]
    batch = processor(images=images, prompts=prompts, suffixes=["a short answer"] * len(prompts))
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    raw = model16(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"])
    assert raw.dtype == mx.bfloat16, "activations must stay in bf16 (no silent float32 upcast)"
    ours = np.asarray(raw.astype(mx.float32))[mask]
    ref = hf_logits(ckpt_dir, as_numpy(batch))[mask]
    agreement = (ours.argmax(-1) == ref.argmax(-1)).mean()
    with capsys.disabled():
        print(f"\n[bf16 {ckpt_dir.name}] max |diff| {np.abs(ours - ref).max():.4f}, "
              f"top-1 agreement {agreement:.2%} over {len(ref)} positions")
    assert agreement >= 0.99
