"""KV cache of both backends (one API): prefill(prefix) + one-token decode steps == the full forward.

The same tests run on the MLX model and the PyTorch reference, through the same calls
(`make_cache(attention_mask=None)`, `__call__(..., cache=)`, `prefill`, `decode_step`).
Measured max abs diff against the full forward (float32, CPU): MLX 0 (bit-identical), PyTorch
2.4e-6 / 3.7e-6 (PaliGemma 1 / 2, whose sliding layers keep 8 positions through 34 decode steps).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_paligemma
from mlx_paligemma import reference
from mlx_paligemma.errors import PaliGemmaError
from mlx_paligemma.models import cache as mlx_cache
from mlx_paligemma.reference import cache as torch_cache
from tests.helpers import noise_image

FP32_TOL = 1e-4
LONG_SUFFIX = "a small grey cat sitting on a red mat next to two dogs and a bird near the house"


def to_numpy(x) -> np.ndarray:
    return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x.astype(mx.float32))


def concat(outs: list) -> np.ndarray:
    return np.concatenate([to_numpy(o) for o in outs], axis=1)


def max_diff(a, b) -> float:
    return (
        float(np.abs(to_numpy(a) - to_numpy(b)).max())
        if not isinstance(a, np.ndarray)
        else float(np.abs(a - to_numpy(b)).max())
    )


@pytest.fixture(scope="module", params=["mlx", "torch"])
def loaded(request, ckpt_dir):
    if request.param == "mlx":
        model, processor = mlx_paligemma.load(ckpt_dir, dtype="float32")
    else:
        model, processor = reference.load(ckpt_dir, device="cpu", dtype="float32")
    return ckpt_dir, model, processor


def numpy_batch(processor, **kwargs) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in processor(**kwargs).items()}


def decode_step_by_step(model, batch, prefix_len: int):
    """Prefill the first `prefix_len` positions in one call, then feed one token per call."""
    cache = model.make_cache()
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    outs = [model(ids[:, :prefix_len], batch["pixel_values"], mask[:, :prefix_len], types[:, :prefix_len], cache=cache)]
    for t in range(prefix_len, ids.shape[1]):
        outs.append(model(ids[:, t : t + 1], cache=cache))
    return concat(outs), cache


def test_prefill_then_decode_equals_full_forward(loaded):
    _, model, processor = loaded
    batch = numpy_batch(processor, images=[noise_image(60, 40, seed=4)], prompts=["caption en"], suffixes=[LONG_SUFFIX])
    prefix_len = int((batch["token_type_ids"][0] == 0).sum())
    steps, cache = decode_step_by_step(model, batch, prefix_len)
    assert max_diff(steps, model(**batch)) <= FP32_TOL
    assert cache.offset == batch["input_ids"].shape[1]


def test_sliding_layers_keep_only_the_window_across_many_decode_steps(loaded, monkeypatch):
    """PyTorch keeps exactly the window; MLX drops its oldest slots every `step` tokens (4 here, 256
    by default) and masks the extra ones. Either way the logits equal the full forward's."""
    _, model, processor = loaded
    monkeypatch.setattr(mlx_cache.LayerCache, "step", 4)
    cfg = model.config.text_config
    batch = numpy_batch(
        processor, images=[noise_image(50, 50, seed=5)], prompts=["describe en"], suffixes=[LONG_SUFFIX]
    )
    prefix_len = int((batch["token_type_ids"][0] == 0).sum())
    decode_steps = batch["input_ids"].shape[1] - prefix_len
    steps, cache = decode_step_by_step(model, batch, prefix_len)
    assert max_diff(steps, model(**batch)) <= FP32_TOL
    slack = 0 if isinstance(cache, torch_cache.PrefixLMCache) else 4
    for i, layer in enumerate(cache.layers):
        assert layer.offset == cache.offset
        if cfg.is_sliding(i):
            assert min(cfg.sliding_window, cache.offset) <= layer.stored <= cfg.sliding_window + slack
        else:
            assert layer.stored == cache.offset
    if cfg.sliding_window is not None:
        assert decode_steps > cfg.sliding_window, "more decode steps than the window, or nothing is tested"
        assert any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))


def test_padded_batch_decodes_like_the_full_forward(loaded):
    """Left padding and rows whose prefixes end at different places: prefill up to the longest prefix."""
    _, model, processor = loaded
    batch = numpy_batch(
        processor,
        images=[noise_image(70, 30, seed=6), noise_image(30, 70, seed=7)],
        prompts=["caption en", "answer en how many dogs are on the sofa?"],
        suffixes=[LONG_SUFFIX, "two"],
    )
    prefix_len = int((batch["token_type_ids"] == 0).sum(axis=1).max())
    steps, _ = decode_step_by_step(model, batch, prefix_len)
    mask = batch["attention_mask"].astype(bool)
    assert float(np.abs(steps[mask] - to_numpy(model(**batch))[mask]).max()) <= FP32_TOL


def test_prefix_tokens_after_the_prefill_are_refused(loaded):
    """The prefix is bidirectional: a second prefix chunk could not see the first one's future."""
    _, model, processor = loaded
    batch = numpy_batch(processor, images=[noise_image(20, 20)], prompts=["caption en"])
    cache = model.make_cache()
    model(
        batch["input_ids"][:, :-2], batch["pixel_values"], token_type_ids=batch["token_type_ids"][:, :-2], cache=cache
    )
    with pytest.raises(PaliGemmaError, match="only add suffix tokens"):
        model(batch["input_ids"][:, -2:], token_type_ids=batch["token_type_ids"][:, -2:], cache=cache)


def test_prefill_and_decode_step_match_the_full_forward(loaded):
    """The generation entry points, with the padding mask given to `make_cache`: last-position logits only."""
    _, model, processor = loaded
    batch = numpy_batch(processor, images=[noise_image(40, 40, seed=8)], prompts=["ocr"], suffixes=[LONG_SUFFIX])
    full = to_numpy(model(**batch))
    prefix_len = int((batch["token_type_ids"][0] == 0).sum())
    ids = batch["input_ids"]
    cache = model.make_cache(batch["attention_mask"][:, :prefix_len])
    first = model.prefill(ids[:, :prefix_len], model.encode_image(batch["pixel_values"]), cache)
    assert tuple(first.shape) == (1, model.config.text_config.vocab_size)
    assert max_diff(full[:, prefix_len - 1], first) <= FP32_TOL
    for t in range(prefix_len, ids.shape[1]):
        assert max_diff(full[:, t], model.decode_step(ids[:, t], cache)) <= FP32_TOL


def test_greedy_generation_matches_across_backends(pg2_dir):
    """The shared generation loop drives both backends (`reference.generation.TorchRunner` for torch)."""
    image = noise_image(64, 48, seed=9)
    torch_model, torch_processor = reference.load(pg2_dir, device="cpu", dtype="float32")
    mlx_model, mlx_processor = mlx_paligemma.load(pg2_dir, dtype="float32")
    ours = mlx_paligemma.generate(torch_model, torch_processor, image, "caption en", max_tokens=20)
    theirs = mlx_paligemma.generate(mlx_model, mlx_processor, image, "caption en", max_tokens=20)
    assert ours.token_ids == theirs.token_ids and len(ours.token_ids) > 8


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("cached", [False, True])
def test_mask_rules_are_the_same_in_both_backends(window, cached):
    """`prefix_lm_masks` is mirrored per framework (it runs on the device); this holds the twins equal."""
    rng = np.random.default_rng(window or 0)
    B, L = 3, 9
    attention_mask = (rng.random((B, L)) > 0.2).astype(np.int32)
    if cached:  # a decode step: 2 queries at the end, keys = the last 5 positions
        types, q, k = None, np.arange(L - 2, L), np.arange(L - 5, L)
    else:
        types, q, k = (rng.random((B, L)) > 0.6).astype(np.int32), None, None
    m = mlx_cache.prefix_lm_masks(
        mx.array(attention_mask),
        None if types is None else mx.array(types),
        window,
        None if q is None else mx.array(q),
        None if k is None else mx.array(k),
    )
    t = torch_cache.prefix_lm_masks(
        torch.from_numpy(attention_mask),
        None if types is None else torch.from_numpy(types),
        window,
        None if q is None else torch.from_numpy(q),
        None if k is None else torch.from_numpy(k),
    )
    assert m.keys() == t.keys()
    for kind in m:
        assert (m[kind] is None) == (t[kind] is None)
        if m[kind] is not None:
            np.testing.assert_array_equal(np.asarray(m[kind]), t[kind].numpy())


def test_image_features_are_placed_alike_in_both_backends(pg1_dir):
    """`embed_inputs` is mirrored per framework; left padding moves the image tokens, and both follow them."""
    mlx_model, processor = mlx_paligemma.load(pg1_dir, dtype="float32")
    torch_model, _ = reference.load(pg1_dir, device="cpu", dtype="float32")
    batch = numpy_batch(
        processor, images=[noise_image(30, 30, seed=1)] * 2, prompts=["caption en", "answer en what is it?"]
    )
    assert batch["attention_mask"][0, 0] == 0, "the first row is padded, or nothing moves"
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, processor.num_image_tokens, 64)).astype(np.float32)
    ours = mlx_model.embed_inputs(mx.array(batch["input_ids"]), mx.array(features))
    theirs = torch_model.embed_inputs(torch.from_numpy(batch["input_ids"]).long(), torch.from_numpy(features))
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=0, atol=1e-6)
    is_image = batch["input_ids"] == processor.image_token_id
    np.testing.assert_array_equal(to_numpy(ours)[is_image], features.reshape(-1, 64))
