"""Gemma's RMSNorm computes its scale 1 + w once per weight array: saved checkpoints keep w (the original
format), a new weight (an update, autodiff's tracers) gets its own scale, and full fine-tuning's gradient on a
norm weight is the true one."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import mlx_paligemma as mp
from mlx_paligemma.models.gemma import RMSNorm
from mlx_paligemma.quantize import quantize
from tests.helpers import noise_image

NORM = "language_model.layers.0.input_layernorm.weight"


def _stored(directory) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _batch(processor):
    return processor(images=[noise_image(40, 30)], prompts=["caption en"])


def test_the_scale_is_not_a_parameter_and_saves_write_w(pg2_dir, tmp_path):
    model, processor = mp.load(pg2_dir)
    mx.eval(model(**_batch(processor)))  # every norm has computed its scale
    norm = model.language_model.layers[0].input_layernorm
    assert norm.scale is norm.scale  # computed once, reused
    np.testing.assert_array_equal(np.asarray(norm.scale), 1 + np.asarray(norm.weight))
    names = [k for k, _ in tree_flatten(model.parameters())] + [k for k, _ in tree_flatten(model.state)]
    assert not any("folded" in k or "scale" in k.split(".")[-1] for k in names)
    source = {k.replace("language_model.model.", "language_model."): v for k, v in _stored(pg2_dir).items()}
    saved = _stored(quantize(pg2_dir, tmp_path / "copy", progress=lambda message: None))
    gemma_norms = [k for k in saved if k.startswith("language_model.") and "norm" in k]
    assert len(gemma_norms) == 4 * model.config.text_config.num_hidden_layers + 1
    for key in gemma_norms:
        np.testing.assert_array_equal(saved[key], source[key])  # w, not 1 + w


def test_an_updated_weight_gets_its_own_scale(pg2_dir):
    model, processor = mp.load(pg2_dir)
    batch = _batch(processor)
    before = model(**batch)
    new = {k: v + 0.25 for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")}
    model.load_weights(list(new.items()), strict=False)
    fresh, _ = mp.load(pg2_dir)
    fresh.load_weights(list(new.items()), strict=False)
    after = model(**batch)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(fresh(**batch)))
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3


def test_full_fine_tuning_gradient_on_a_norm_weight(pg2_dir, monkeypatch):
    """nn.value_and_grad (as `finetune --full`): every norm weight's gradient equals that of a norm computing
    1 + w in every call, and agrees with central differences of the loss (summed in float64 on the host)."""
    model, processor = mp.load(pg2_dir)
    batch = _batch(processor)
    direction = np.random.default_rng(0).standard_normal(model(**batch).shape)

    def loss(m) -> mx.array:
        return (m(**batch) * mx.array(direction.astype(np.float32))).sum()

    def norm_grads() -> dict[str, np.ndarray]:
        _, grads = nn.value_and_grad(model, loss)(model)
        return {k: np.asarray(v) for k, v in tree_flatten(grads) if k.endswith("norm.weight")}

    folded = norm_grads()
    monkeypatch.setattr(RMSNorm, "scale", property(lambda self: 1.0 + self.weight))  # no caching at all
    unfolded = norm_grads()
    assert folded.keys() == unfolded.keys() and len(folded) > 4
    for key in folded:
        np.testing.assert_allclose(folded[key], unfolded[key], rtol=1e-5, atol=1e-5)
    w = np.asarray(dict(tree_flatten(model.parameters()))[NORM])
    eps = 1e-2
    for i in (0, 5, len(w) - 1):
        values = []
        for sign in (1, -1):
            shifted = w.copy()
            shifted[i] += sign * eps
            model.load_weights([(NORM, mx.array(shifted))], strict=False)
            values.append(float((np.asarray(model(**batch)).astype(np.float64) * direction).sum()))
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(folded[NORM][i] - numeric) <= 1e-2 * max(1.0, abs(numeric)), (i, folded[NORM][i], numeric)
