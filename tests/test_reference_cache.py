"""KV cache of the reference backend: prefill(prefix) + one-token decode steps == the full forward.

Measured max abs diff against the full forward (float32, CPU): 3.0e-6 (PaliGemma 1) and 3.3e-6
(PaliGemma 2, whose sliding layers keep 8 positions through 34 decode steps).
"""

from __future__ import annotations

import pytest
import torch

from mlx_paligemma import reference
from mlx_paligemma.errors import PaliGemmaError
from test_reference_logits import CHECKPOINTS, max_diff, noise_image, tiny_checkpoint

FP32_TOL = 1e-4
LONG_SUFFIX = "a small grey cat sitting on a red mat next to two dogs and a bird near the house"


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def loaded(request, tmp_path_factory):
    model, processor = reference.load(tiny_checkpoint(tmp_path_factory, request.param), device="cpu",
                                      dtype="float32")
    return model, processor


def decode_step_by_step(model, batch, prefix_len: int) -> tuple[torch.Tensor, reference.PrefixLMCache]:
    """Prefill the first `prefix_len` positions in one call, then feed one token per call."""
    cache = model.make_cache()
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    outs = [model(ids[:, :prefix_len], batch["pixel_values"], mask[:, :prefix_len], types[:, :prefix_len],
                  cache=cache)]
    for t in range(prefix_len, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(outs, dim=1), cache


def test_prefill_then_decode_equals_full_forward(loaded):
    model, processor = loaded
    batch = processor(images=[noise_image(60, 40, seed=4)], prompts=["caption en"], suffixes=[LONG_SUFFIX])
    prefix_len = int((batch["token_type_ids"][0] == 0).sum())
    steps, cache = decode_step_by_step(model, batch, prefix_len)
    assert max_diff(steps, model(**batch)) <= FP32_TOL
    assert cache.offset == batch["input_ids"].shape[1]


def test_sliding_layers_keep_only_the_window_across_many_decode_steps(loaded):
    model, processor = loaded
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
    model, processor = loaded
    batch = processor(images=[noise_image(70, 30, seed=6), noise_image(30, 70, seed=7)],
                      prompts=["caption en", "answer en how many dogs are on the sofa?"],
                      suffixes=[LONG_SUFFIX, "two"])
    prefix_len = int((batch["token_type_ids"] == 0).sum(dim=1).max())
    steps, _ = decode_step_by_step(model, batch, prefix_len)
    mask = batch["attention_mask"].bool()
    assert max_diff(steps[mask], model(**batch)[mask]) <= FP32_TOL


def test_prefix_tokens_after_the_prefill_are_refused(loaded):
    """The prefix is bidirectional: a second prefix chunk could not see the first one's future."""
    model, processor = loaded
    batch = processor(images=[noise_image(20, 20)], prompts=["caption en"])
    cache = model.make_cache()
    model(batch["input_ids"][:, :-2], batch["pixel_values"], token_type_ids=batch["token_type_ids"][:, :-2],
          cache=cache)
    with pytest.raises(PaliGemmaError, match="only add suffix tokens"):
        model(batch["input_ids"][:, -2:], token_type_ids=batch["token_type_ids"][:, -2:], cache=cache)
