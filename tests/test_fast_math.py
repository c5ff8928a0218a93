"""The CPU approximations of models/fast_math.py against the exact float64 values and MLX's own ops, over
the whole float32 range (zeros, denormals, 1e-45..3e38, infinities, NaN); their gradients; and the choice
the models make (the approximations on the CPU in float32 only, MLX's ops on a stubbed GPU)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_paligemma import accel
from mlx_paligemma.models import fast_math
from tests.helpers import noise_image

FLT_MIN = float(np.finfo(np.float32).tiny)
GELU_C = np.sqrt(2 / np.pi)


def _sweep() -> np.ndarray:
    """Every magnitude float32 has (denormals to FLT_MAX, log-spaced), a dense grid where the functions bend,
    and the special values, with both signs."""
    magnitudes = np.concatenate([np.logspace(-45, np.log10(3.4e38), 200_000), np.linspace(0, 20, 200_001)])
    x = np.concatenate([magnitudes, -magnitudes, [0.0, -0.0, 1e-40, -1e-40, np.inf, -np.inf, np.nan]])
    return x.astype(np.float32)


X = _sweep()
X64 = X.astype(np.float64)


def _exact_gelu(x: np.ndarray) -> np.ndarray:
    u = GELU_C * (x + 0.044715 * x**3)
    return x / (1 + np.exp(-2 * u))  # = 0.5 x (1 + tanh u), without the cancellation


def _ours(fn, x: np.ndarray = X) -> np.ndarray:
    return np.asarray(fn(mx.array(x))).astype(np.float64)


@pytest.fixture(autouse=True)
def _quiet_numpy():
    with np.errstate(all="ignore"):
        yield


def test_exp_within_1e6_relative_and_flushes_below_2e_38():
    got, exact = _ours(fast_math.fast_exp), np.exp(X64)
    kept = (got != 0) & (exact <= np.finfo(np.float32).max)
    assert np.max(np.abs(got[kept] - exact[kept]) / exact[kept]) <= 1e-6
    assert np.all(exact[(got == 0) & ~np.isnan(X64)] < 2e-38)  # only results below 2e-38 flush to zero
    assert np.all(np.isinf(got[exact > np.finfo(np.float32).max]))
    special = _ours(fast_math.fast_exp, np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40]))
    assert special[0] == np.inf and special[1] == 0 and np.isnan(special[2]) and np.all(special[3:] == 1)


def test_tanh_within_1e6_relative_of_exact_and_of_mlx():
    got, exact, mlx = _ours(fast_math.fast_tanh), np.tanh(X64), _ours(mx.tanh)
    finite = ~np.isnan(X64)
    scale = np.maximum(np.abs(exact), FLT_MIN)  # denormal outputs: absolute error below FLT_MIN * 1e-6
    assert np.max(np.abs(got[finite] - exact[finite]) / scale[finite]) <= 1e-6
    assert np.max(np.abs(got[finite] - mlx[finite]) / scale[finite]) <= 1e-6
    assert np.isnan(got[np.isnan(X64)]).all()
    assert _ours(fast_math.fast_tanh, np.float32([np.inf, -np.inf])).tolist() == [1.0, -1.0]


def test_gelu_error_is_that_of_the_tanh_form():
    """Relative error <= 1e-6 for x >= -1; below, 0.5 x (1 + tanh u) cancels in float32 for every
    implementation (MLX's own op is off by 1.2e-5 relative at x = -2), so the bound there is 1e-6 * |x|."""
    got, exact, mlx = _ours(fast_math.fast_gelu_approx), _exact_gelu(X64), _ours(nn.gelu_approx)
    finite = np.isfinite(X64)
    assert np.max(np.abs(got[finite] - exact[finite]) / np.maximum(np.abs(X64[finite]), FLT_MIN)) <= 1e-6
    assert np.max(np.abs(got[finite] - mlx[finite]) / np.maximum(np.abs(X64[finite]), FLT_MIN)) <= 1e-6
    upper = finite & (X64 >= -1) & (np.abs(exact) >= FLT_MIN)
    assert np.max(np.abs(got[upper] - exact[upper]) / np.abs(exact[upper])) <= 1e-6
    special = _ours(fast_math.fast_gelu_approx, np.float32([np.inf, -np.inf, np.nan, 0.0]))
    reference = _ours(nn.gelu_approx, np.float32([np.inf, -np.inf, np.nan, 0.0]))
    np.testing.assert_array_equal(special, reference)  # inf, NaN (as MLX: -inf * 0), NaN, 0


def test_softmax_within_1e6_relative_with_masks_and_nan():
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((64, 300)) * rng.choice([0.1, 1, 30, 1000], (64, 1))).astype(np.float32)
    scores[:8, ::3] = np.finfo(np.float32).min  # masked as the models mask
    scores[8:12, 5:] = -np.inf
    shifted = (scores - scores.max(-1, keepdims=True)).astype(np.float64)  # rounded to float32 as in any softmax
    exact = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    got, mlx = _ours(fast_math.fast_softmax, scores), _ours(lambda a: mx.softmax(a, axis=-1), scores)
    kept = got != 0
    assert np.max(np.abs(got[kept] - exact[kept]) / exact[kept]) <= 1e-6
    assert np.all(exact[~kept] < 2e-38)  # only weights below 2e-38 flush to zero
    assert np.all(got[:8, ::3] == 0) and np.all(got[8:12, 5:] == 0)
    # MLX's own softmax is off by up to 4e-6 relative on weights below 1e-15: ours is never further from it
    assert np.all(np.abs(got - mlx) <= 1e-6 * exact + np.abs(mlx - exact) + 2e-38)  # than 1e-6 beyond that
    nan_row = np.float32([[1.0, np.nan, 2.0]])
    assert np.isnan(_ours(fast_math.fast_softmax, nan_row)).all()
    other_axis = _ours(lambda a: fast_math.fast_softmax(a, axis=0), scores.T.copy())
    np.testing.assert_array_equal(other_axis, got.T)


def test_gradients_match_mlx_autodiff():
    x = mx.array(np.linspace(-12, 12, 20_001, dtype=np.float32))
    weights = mx.array(np.random.default_rng(1).standard_normal(20_001).astype(np.float32))

    def grad_of(fn):
        return np.asarray(mx.grad(lambda v: (fn(v) * weights).sum())(x))

    x64 = np.asarray(x).astype(np.float64)
    t = np.tanh(GELU_C * (x64 + 0.044715 * x64**3))
    exact = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * x64**2)
    exact *= np.asarray(weights)
    # GELU's derivative has the factor x^3 (1 - tanh^2): 1e-7 of tanh becomes up to 5e-6 of it, in MLX's too.
    np.testing.assert_allclose(grad_of(fast_math.fast_gelu_approx), exact, atol=1e-5)
    np.testing.assert_allclose(grad_of(nn.gelu_approx), exact, atol=1e-5)
    tanh_grad = np.asarray(mx.grad(lambda v: fast_math.fast_tanh(v).sum())(x))
    np.testing.assert_allclose(tanh_grad, np.asarray(mx.grad(lambda v: mx.tanh(v).sum())(x)), atol=1e-6)
    np.testing.assert_allclose(grad_of(fast_math.fast_exp), grad_of(mx.exp), rtol=1e-6)
    rows = mx.array(np.random.default_rng(2).standard_normal((7, 50)).astype(np.float32) * 5)
    row_weights = mx.array(np.random.default_rng(3).standard_normal((7, 50)).astype(np.float32))
    ours = mx.grad(lambda v: (fast_math.fast_softmax(v) * row_weights).sum())(rows)
    theirs = mx.grad(lambda v: (mx.softmax(v, axis=-1) * row_weights).sum())(rows)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)


def test_the_cpu_uses_the_approximations_in_float32_only(monkeypatch):
    used = []
    monkeypatch.setattr(fast_math, "fast_gelu_approx", lambda x: used.append("fast") or nn.gelu_approx(x))
    fast_math.gelu_approx(mx.ones((2,)))
    fast_math.gelu_approx(mx.ones((2,), mx.bfloat16))
    assert used == ["fast"]


def test_the_gpu_keeps_mlx_ops(monkeypatch, pg2_dir):
    """With the device stubbed as Metal, a PaliGemma 2 forward (GELU, soft-caps) calls none of the approximations."""
    import mlx_paligemma as mp

    model, processor = mp.load(pg2_dir)
    batch = processor(images=[noise_image(40, 30)], prompts=["caption en"])
    calls = []
    for name in ("fast_gelu_approx", "fast_tanh", "fast_softmax", "fast_exp"):
        original = getattr(fast_math, name)
        monkeypatch.setattr(fast_math, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    cpu_logits = model(**batch)
    mx.eval(cpu_logits)
    assert {"fast_gelu_approx", "fast_tanh"} <= set(calls)
    calls.clear()
    monkeypatch.setattr(accel, "on_gpu", lambda: True)  # CPU arrays, the GPU's choice of ops
    gpu_logits = model(**batch)
    mx.eval(gpu_logits)
    assert calls == []
    monkeypatch.setattr(accel, "on_gpu", lambda: False)  # a CUDA GPU: no Metal, but not the CPU either
    monkeypatch.setattr(fast_math, "_default_device_is_cpu", lambda: False)
    mx.eval(model(**batch))
    assert calls == []
    np.testing.assert_allclose(np.asarray(cpu_logits), np.asarray(gpu_logits), atol=1e-4)
