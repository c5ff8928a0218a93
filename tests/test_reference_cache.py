"""KV cache of the reference backend: prefill(prefix) + one-token decode steps == the full forward.

Measured max abs diff against the full forward (float32, CPU): 3.0e-6 (PaliGemma 1) and 3.3e-6
(PaliGemma 2, whose sliding layers keep 8 positions through 34 decode steps).
"""

from __future__ import annotations

import pytest
import torch

from mlx_paligemma import reference
from mlx_paligemma.errors import PaliGemmaError
from tests.test_reference_logits import CHECKPOINTS, max_diff, noise_image, tiny_checkpoint

FP32_TOL = 1e-4
LONG_SUFFIX = "a small grey cat sitting on a red mat next to two dogs and a bird near the house"


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def loaded(request, tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, request.param)
    model, processor = reference.load(ckpt, device="cpu", dtype="float32")
    return ckpt, model, processor


def decode_step_by_step(model, batch, prefix_len: int) -> tuple[torch.Tensor, reference.PrefixLMCache]:
    """Prefill the first `prefix_len` positions in one call, then feed one token per call."""
    cache = model.make_cache()
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    outs = [model(ids[:, :prefix_len], batch["pixel_values"], mask[:, :prefix_len], types[:, :prefix_len], cache=cache)]
    for t in range(prefix_len, ids.shape[1]):
        outs.append(model(ids[:, t : t + 1], cache=cache))
    return torch.cat(outs, dim=1), cache


def test_prefill_then_decode_equals_full_forward(loaded):
    _, model, processor = loaded
    batch = processor(images=[noise_image(60, 40, seed=4)], prompts=["caption en"], suffixes=[LONG_SUFFIX])
    prefix_len = int((batch["token_type_ids"][0] == 0).sum())
    steps, cache = decode_step_by_step(model, batch, prefix_len)
    assert max_diff(steps, model(**batch)) <= FP32_TOL
    assert cache.offset == batch["input_ids"].shape[1]


def test_sliding_layers_keep_only_the_window_across_many_decode_steps(loaded):
    _, model, processor = loaded
    cfg = model.config.text_config
    batch = processor(images=[noise_image(50, 50, seed=5)], prompts=["describe en"], suffixes=[LONG_SUFFIX])
    prefix_len = int((batch["token_type_ids"][0] == 0).sum())
    decode_steps = batch["input_ids"].shape[1] - prefix_len
    _, cache = decode_step_by_step(model, batch, prefix_len)
    for i, layer in enumerate(cache.layers):
        expected = min(cfg.sliding_window, cache.offset) if cfg.is_sliding(i) else cache.offset
        assert layer.keys.shape[2] == expected
    if cfg.sliding_window is not None:
        assert decode_steps > cfg.sliding_window, "more decode steps than the window, or nothing is tested"
        assert any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))


def test_padded_batch_decodes_like_the_full_forward(loaded):
    """Left padding and rows whose prefixes end at different places: prefill up to the longest prefix."""
    _, model, processor = loaded
    batch = processor(
        images=[noise_image(70, 30, seed=6), noise_image(30, 70, seed=7)],
        prompts=["caption en", "answer en how many dogs are on the sofa?"],
        suffixes=[LONG_SUFFIX, "two"],
    )
    prefix_len = int((batch["token_type_ids"] == 0).sum(dim=1).max())
    steps, _ = decode_step_by_step(model, batch, prefix_len)
    mask = batch["attention_mask"].bool()
    assert max_diff(steps[mask], model(**batch)[mask]) <= FP32_TOL


def test_prefix_tokens_after_the_prefill_are_refused(loaded):
    """The prefix is bidirectional: a second prefix chunk could not see the first one's future."""
    _, model, processor = loaded
    batch = processor(images=[noise_image(20, 20)], prompts=["caption en"])
    cache = model.make_cache()
    model(
        batch["input_ids"][:, :-2], batch["pixel_values"], token_type_ids=batch["token_type_ids"][:, :-2], cache=cache
    )
    with pytest.raises(PaliGemmaError, match="only add suffix tokens"):
        model(batch["input_ids"][:, -2:], token_type_ids=batch["token_type_ids"][:, -2:], cache=cache)


def test_prefill_and_decode_step_match_the_full_forward(loaded):
    """The generation entry points (mirroring the MLX Model's) return last-position logits only."""
    _, model, processor = loaded
    batch = processor(images=[noise_image(40, 40, seed=8)], prompts=["ocr"], suffixes=[LONG_SUFFIX])
    full = model(**batch)
    prefix_len = int((batch["token_type_ids"][0] == 0).sum())
    ids = batch["input_ids"]
    cache = model.make_cache()
    first = model.prefill(
        ids[:, :prefix_len], model.encode_image(batch["pixel_values"]), cache, batch["attention_mask"][:, :prefix_len]
    )
    assert first.shape == (1, model.config.text_config.vocab_size)
    assert max_diff(first, full[:, prefix_len - 1]) <= FP32_TOL
    for t in range(prefix_len, ids.shape[1]):
        assert max_diff(model.decode_step(ids[:, t], cache), full[:, t]) <= FP32_TOL


def test_greedy_generation_matches_the_mlx_backend(loaded):
    """The shared generation loop drives the reference through `reference.generation.TorchRunner`."""
    import mlx_paligemma

    ckpt, model, processor = loaded
    mlx_model, mlx_processor = mlx_paligemma.load(ckpt)
    image = noise_image(64, 48, seed=9)
    ours = mlx_paligemma.generate(model, processor, image, "caption en", max_tokens=20)
    theirs = mlx_paligemma.generate(mlx_model, mlx_processor, image, "caption en", max_tokens=20)
    assert ours.token_ids == theirs.token_ids and len(ours.token_ids) > 8
