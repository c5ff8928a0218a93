"""The PyTorch reference backend against transformers (the oracle) and against the MLX backend.

Measured on the fixture checkpoints (float32, CPU, logits up to ~7), max abs diff over the
non-padded positions of the cases below:
  reference vs transformers   PaliGemma 1 <= 2.7e-6, PaliGemma 2 <= 4.3e-6
  reference vs MLX            PaliGemma 1 <= 4.6e-6, PaliGemma 2 <= 4.9e-6
so 1e-4 leaves a margin of 20x and still catches any real slip (a wrong norm, scale or mask
moves logits by >1e-2). bfloat16: see `test_bfloat16_mlx_and_reference_agree_on_top1`.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import mlx_paligemma
from mlx_paligemma import reference
from mlx_paligemma.errors import CheckpointError
from tools.make_tiny_checkpoint import make_tiny_checkpoint

FP32_TOL = 1e-4

CHECKPOINTS = {
    # PaliGemma 1: sparse hub config, hub key layout, two shards.
    "pg1": dict(version=1, layout="hub", shards=2, sparse_config=True),
    # PaliGemma 2: transformers-5 layout, sliding window 8 (< every sequence below).
    "pg2": dict(version=2, layout="transformers", sliding_window=8),
}


def tiny_checkpoint(factory: pytest.TempPathFactory, name: str) -> Path:
    """Built once per session even when several test modules ask for it."""
    path = factory.getbasetemp() / "reference-checkpoints" / name
    if not (path / "config.json").is_file():
        make_tiny_checkpoint(path, **CHECKPOINTS[name])
    return path


@pytest.fixture(scope="session", params=sorted(CHECKPOINTS))
def ref_ckpt(request, tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def ref_loaded(ref_ckpt):
    model, processor = reference.load(ref_ckpt, device="cpu", dtype="float32")
    return ref_ckpt, model, processor


@pytest.fixture(scope="session")
def hf_oracle(ref_ckpt):
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(ref_ckpt, dtype=torch.float32).eval()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def oracle_logits(hf, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return hf(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits


def max_diff(a, b) -> float:
    return float((torch.as_tensor(np.asarray(a)) - torch.as_tensor(np.asarray(b))).abs().max())


# -- against transformers -----------------------------------------------------------------------
def test_prompt_matches_transformers(ref_loaded, hf_oracle):
    _, model, processor = ref_loaded
    batch = processor(images=[noise_image(80, 60)], prompts=["caption en"])
    ours = model(**batch)
    assert ours.shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert max_diff(ours, oracle_logits(hf_oracle, batch)) <= FP32_TOL


def test_prompt_with_suffix_matches_transformers(ref_loaded, hf_oracle):
    _, model, processor = ref_loaded
    batch = processor(
        images=[noise_image(64, 64, seed=3)],
        prompts=["answer en what is this?"],
        suffixes=["a small grey cat on a mat"],
    )
    assert int(batch["token_type_ids"].sum()) > 3, "the suffix must be several tokens long"
    assert max_diff(model(**batch), oracle_logits(hf_oracle, batch)) <= FP32_TOL


def test_padded_batch_rows_equal_single_runs_and_transformers(ref_loaded, hf_oracle):
    _, model, processor = ref_loaded
    images = [noise_image(100, 50, seed=1), noise_image(40, 90, seed=2)]
    prompts = ["caption en", "answer en how many dogs are sitting on the red sofa?"]
    batch = processor(images=images, prompts=prompts)
    mask = batch["attention_mask"].bool()
    assert mask[0].sum() < mask[1].sum(), "prompts must differ in length so that one row is padded"
    ours, ref = model(**batch), oracle_logits(hf_oracle, batch)
    for row, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        single = model(**processor(images=[image], prompts=[prompt]))[0]
        assert max_diff(ours[row][mask[row]], single) <= FP32_TOL
        assert max_diff(ours[row][mask[row]], ref[row][mask[row]]) <= FP32_TOL


def test_sequences_are_longer_than_the_sliding_window(ref_loaded):
    """Makes the PaliGemma 2 comparisons meaningful: some keys fall outside the window of 8."""
    _, model, processor = ref_loaded
    batch = processor(images=[noise_image(32, 32)], prompts=["caption en"])
    assert batch["input_ids"].shape[1] > 8


def test_numpy_inputs_and_defaults(ref_loaded, hf_oracle):
    """Defaults: no padding and everything prefix; numpy arrays accepted, like the MLX Model."""
    _, model, processor = ref_loaded
    batch = processor(images=[noise_image(30, 30)], prompts=["detect cat"])
    ours = model(batch["input_ids"].numpy(), batch["pixel_values"].numpy())
    assert max_diff(ours, oracle_logits(hf_oracle, batch)) <= FP32_TOL


def test_processor_yields_torch_tensors_with_the_mlx_processor_keys(ref_loaded):
    ckpt, _, processor = ref_loaded
    _, mlx_processor = mlx_paligemma.load(ckpt)
    ours = processor(images=[noise_image(20, 20)], prompts=["ocr"], suffixes=["text"])
    theirs = mlx_processor(images=[noise_image(20, 20)], prompts=["ocr"], suffixes=["text"])
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert isinstance(ours[key], torch.Tensor) and ours[key].device.type == "cpu"
        assert np.array_equal(ours[key].numpy(), np.asarray(theirs[key]))


def test_forward_runs_in_inference_mode(ref_loaded):
    _, model, processor = ref_loaded
    out = model(**processor(images=[noise_image(20, 20)], prompts=["ocr"]))
    assert out.is_inference() and not out.requires_grad


# -- against the MLX backend ----------------------------------------------------------------------
def batch_for_both(processor) -> dict:
    prompts = [
        "caption en",
        "answer en what colour is the car parked near the house?",
        "detect cat ; dog",
        "describe en",
        "ocr",
        "question en a bird",
    ]
    images = [noise_image(40 + 10 * i, 70 - 5 * i, seed=10 + i) for i in range(len(prompts))]
    return processor(images=images, prompts=prompts, suffixes=["a short answer"] * len(prompts))


def mlx_logits(model, batch) -> np.ndarray:
    b = {k: v.cpu().numpy() for k, v in batch.items()}
    out = model(
        b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
    )
    return np.asarray(out.astype(mx.float32))


def test_float32_mlx_matches_reference(ref_loaded):
    ckpt, model, processor = ref_loaded
    mlx_model, _ = mlx_paligemma.load(ckpt, dtype="float32")
    batch = batch_for_both(processor)
    mask = batch["attention_mask"].bool().numpy()
    ours = model(**batch).numpy()
    assert max_diff(mlx_logits(mlx_model, batch)[mask], ours[mask]) <= FP32_TOL


def decisive_positions(logits32: np.ndarray) -> np.ndarray:
    """Positions whose float32 top-1 beats the runner-up by at least two bf16 ulps at the logits' magnitude.

    The tiny random models have many near-ties (median top-1 gap ~0.2-0.4 for logits up to ~7),
    and bf16 resolves such logits only to 2^-5 ~ 0.03: there the argmax is a coin toss for any
    pair of bf16 implementations, transformers' own bf16 against its float32 included (~97%).
    Measured: every reference/MLX disagreement sat at a float32 gap <= 0.034 on the fixture
    checkpoints (one at 0.088 over seeds 0-2), none on a decisive position.
    """
    top2 = np.sort(logits32, axis=-1)[:, -2:]
    ulp = 2.0 ** (np.floor(np.log2(np.abs(logits32).max())) - 7)
    return (top2[:, 1] - top2[:, 0]) >= 2 * ulp


def test_bfloat16_mlx_and_reference_agree_on_top1(ref_loaded, capsys):
    """Both in bf16: the argmax agrees on >= 99% of the positions that bf16 can decide.

    Measured on the fixture checkpoints: max |diff| 0.06 (PaliGemma 1) and 0.12 (PaliGemma 2)
    for logits up to ~7; raw top-1 agreement 98% / 97%, 100% on decisive positions.
    """
    ckpt, model32, processor = ref_loaded
    model16, _ = reference.load(ckpt, device="cpu", dtype="bfloat16")
    mlx16, _ = mlx_paligemma.load(ckpt, dtype="bfloat16")
    batch = batch_for_both(processor)
    mask = batch["attention_mask"].bool().numpy()
    raw = model16(**batch)
    assert raw.dtype == torch.bfloat16, "activations must stay in bf16"
    ours = raw.float().numpy()[mask]
    theirs = mlx_logits(mlx16, batch)[mask]
    decisive = decisive_positions(model32(**batch).numpy()[mask])
    same = ours.argmax(-1) == theirs.argmax(-1)
    agreement = same[decisive].mean()
    with capsys.disabled():
        print(
            f"\n[bf16 {ckpt.name}] reference vs MLX: max |diff| {np.abs(ours - theirs).max():.4f}, top-1 "
            f"agreement {agreement:.2%} on {decisive.sum()} decisive positions ({same.mean():.2%} on all "
            f"{len(same)})"
        )
    assert decisive.mean() >= 0.5, "most positions must be decisive, or the test says little"
    assert agreement >= 0.99


# -- loading -----------------------------------------------------------------------------------
def test_default_dtype_is_the_checkpoint_dtype(ref_ckpt, tmp_path):
    model, _ = reference.load(ref_ckpt, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    bf16_ckpt = make_tiny_checkpoint(tmp_path / "bf16", version=1, dtype="bfloat16")
    model16, _ = reference.load(bf16_ckpt, device="cpu")
    assert model16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())


def test_loading_is_strict_and_names_the_key_and_file(ref_ckpt, tmp_path):
    """A tensor the model lacks is an error naming it, never silently ignored (transformers 4.x did)."""
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ref_ckpt.iterdir():
        (broken / f.name).symlink_to(f)
    save_file({"vision_tower.vision_model.head.probe.weight": torch.zeros(2)}, str(broken / "extra.safetensors"))
    index = broken / "model.safetensors.index.json"
    if index.exists():  # a sharded checkpoint lists its files: add ours to the index
        import json

        data = json.loads(index.read_text())
        data["weight_map"]["vision_tower.vision_model.head.probe.weight"] = "extra.safetensors"
        index.unlink()
        index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'vision_tower\.head\.probe\.weight' in extra"):
        reference.load(broken, device="cpu")


def test_mlx_layout_patch_conv_is_transposed_back(ref_ckpt, tmp_path):
    """Checkpoints converted by mlx-vlm store the conv as (O, kh, kw, I): same logits after loading."""
    from safetensors.torch import load_file, save_file

    from mlx_paligemma.checkpoint import open_checkpoint

    ckpt = open_checkpoint(ref_ckpt)
    tensors = {}
    for path in ckpt.files:
        tensors.update(load_file(str(path)))
    conv = next(k for k in tensors if k.endswith("patch_embedding.weight"))
    tensors[conv] = tensors[conv].permute(0, 2, 3, 1).contiguous()
    moved = tmp_path / "mlx-layout"
    moved.mkdir()
    save_file(tensors, str(moved / "model.safetensors"))
    for name in ("config.json", "tokenizer.model"):
        (moved / name).symlink_to(ref_ckpt / name)
    a, processor = reference.load(ref_ckpt, device="cpu")
    b, _ = reference.load(moved, device="cpu")
    batch = processor(images=[noise_image(30, 40)], prompts=["caption en"])
    assert max_diff(a(**batch), b(**batch)) == 0.0
