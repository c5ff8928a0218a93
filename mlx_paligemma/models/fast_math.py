"""float32 exp, tanh, tanh-GELU and softmax from multiply-adds, for MLX's CPU backend.

Why: MLX's CPU `exp` and `tanh` are scalar libm calls, 7-8x the cost of a multiply-add (9.4 M
values, one SigLIP-B forward's GELU inputs: tanh 172 ms, exp 128 ms, a multiply-add 24 ms), and
they made the MLX time to first token twice transformers'. Here each function is a polynomial
or rational approximation with range reduction, traced by `mx.compile` into fused loops that the
C++ compiler vectorises (a few per function: see `_exp`) with no libm call; without a C++ compiler MLX
runs the same graph unfused, still correct.

Error bounds, float32 against the exact float64 value, measured over sweeps of the whole float
range (zeros, denormals, 1e-45..3.4e38 of both signs, +-inf, NaN) by tests/test_fast_math.py:

- `fast_exp`: <= 1e-6 relative (measured 1.7e-7); results below 2e-38 may flush to +0 (no
  denormals), exp(-inf) = 0, inf from ln FLT_MAX up, NaN stays NaN.
- `fast_tanh`: <= 1e-6 relative (measured 3.0e-7); exactly +-1 from |x| >= 7.905, NaN stays NaN.
- `fast_gelu_approx`: transformers' `gelu_pytorch_tanh`, 0.5 x (1 + tanh u): <= 1e-6 relative for
  x >= -1, and |error| <= 1e-6 |x| everywhere (measured 1.9e-7 |x|). Below x = -1 the tanh form
  cancels in float32 in every implementation (MLX's `nn.gelu_approx` is off by 1.2e-5 relative at
  x = -2): the bound there is on the scale of the input. gelu(-inf) is NaN, as in MLX.
  Differentiable (custom VJP, the analytic derivative).
- `fast_softmax`: <= 1e-6 relative for weights from 2e-38 up (smaller ones may flush to 0); masked
  entries (finfo.min or -inf) get exactly 0, a row with a NaN is NaN. Differentiable.

`gelu_approx`, `tanh` and `softmax` choose (`use_fast_math`): these on the CPU for float32, MLX's
own ops on a GPU (Metal's and CUDA's are vectorised already) and for other dtypes.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .. import accel

_LOG2E = 1.4426950408889634
# ln 2 split so that k * _LN2_HI is exact for |k| <= 2**12 (Cody and Waite's range reduction).
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
# 2 e^r to degree 7 (Taylor coefficients 2/n!; |r| <= ln2/2 leaves a truncation error of 0.35^8/8! < 1e-8):
# the factor 2 lets the scale 2^(k-1) cover k = 128, so results up to FLT_MAX need no special case.
_EXP_TAYLOR = tuple(2.0 / math.factorial(n) for n in range(8))
# Rational tanh, x * P(x^2) / Q(x^2), float32 minimax (as Eigen's); |x| >= 7.905 rounds to +-1.
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08)
_TANH_P += (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_TANH_CLAMP = 7.90531110763549805
_GELU_C = math.sqrt(2 / math.pi)
_GELU_A = 0.044715


def _clamp(x: mx.array, low: float, high: float) -> mx.array:
    """Clamp that lets NaN through. A select, not mx.clip: MLX's float min/max check for NaN per element
    and stop the compiled loop from vectorising (3x the cost of a multiply-add here)."""
    return mx.where(x > high, high, mx.where(x < low, low, x))


def _poly(x: mx.array, c: tuple[float, ...]) -> mx.array:
    """sum(c[n] x^n) by Estrin's scheme: depth log2(n) instead of Horner's n, so MLX fuses it into one loop."""
    terms = [c[i] + c[i + 1] * x if i + 1 < len(c) else mx.full(x.shape, c[i], x.dtype) for i in range(0, len(c), 2)]
    power = x * x
    while len(terms) > 1:
        terms = [terms[i] + power * terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        power = power * power
    return terms[0]


# exp's argument is clamped to [ln 2^-126, 89]: below, every result is under 2^-126 and flushes to +0 (the scale
# 2^(k-1) with k = -126 encodes as +0); above, k = 128 and the product overflows to inf, as e^x does from 88.73.
_EXP_LOW, _EXP_HIGH = -87.33654475, 89.0
# v + _ROUND - _ROUND rounds |v| < 2^22 to the nearest integer with two adds (no floor(): a libm call in MLX's
# compiled CPU loops). k + _BIAS is an integer in [2^23, 2^24): its float32 bits are 0x4B000000 + k + 126.
_ROUND = 12582912.0  # 1.5 * 2^23
_BIAS = 126.0 + 8388608.0
_BIAS_BITS = 0x4B000000


def _exp_clamp(z: mx.array) -> mx.array:
    return _clamp(z, _EXP_LOW, _EXP_HIGH)


def _exp_k(c: mx.array) -> mx.array:
    """k = round(c / ln 2) for the clamped argument: an integer in [-126, 128]."""
    return (c * _LOG2E + _ROUND) - _ROUND


def _exp_biased_k(c: mx.array) -> mx.array:
    return _exp_k(c) + _BIAS


def _exp_scale_bits(biased_bits: mx.array) -> mx.array:
    """The int32 bits of 2^(k-1): (k + 126) in the exponent field."""
    return mx.left_shift(biased_bits - _BIAS_BITS, 23)


def _exp_from_scale(c: mx.array, scale: mx.array) -> mx.array:
    """e^c = 2^(k-1) * 2e^r, r = c - k ln2 in [-ln2/2, ln2/2] (k recomputed from c, the same bits as before)."""
    k = _exp_k(c)
    r = (c - k * _LN2_HI) - k * _LN2_LO
    return _poly(r, _EXP_TAYLOR) * scale


# Four loops, each one that the C++ compiler vectorises: MLX's CPU `mx.compile` builds its loops with g++ -O3,
# which (trapping math) keeps a float select that feeds arithmetic as a branch, and a loop with a branch or a
# floor() call scalar; a loop that ends in selects is vectorised. MLX also cannot reinterpret bits (mx.view)
# inside a fused loop. So: the clamp (selects only); k as biased float bits (adds); the scale's bits (integer
# ops, between two views); the polynomial times the scale. 786 k values (one SigLIP-B attention's scores):
# 1.4 ms, against 4.3 ms as the two loops with floor() and selects inside that this replaced.
_exp_clamp_fused = mx.compile(_exp_clamp)
_exp_biased_k_fused = mx.compile(_exp_biased_k)
_exp_scale_bits_fused = mx.compile(_exp_scale_bits)
_exp_from_scale_fused = mx.compile(_exp_from_scale)


def _exp(x: mx.array) -> mx.array:
    c = _exp_clamp_fused(x)
    biased = mx.view(_exp_biased_k_fused(c), mx.int32)
    return _exp_from_scale_fused(c, mx.view(_exp_scale_bits_fused(biased), mx.float32))


def _tanh_ratio(x: mx.array) -> mx.array:
    """x * (P(x^2) / Q(x^2)) for |x| <= the clamp: the ratio first, so denormal-sized x loses no digits in x * P."""
    x2 = x * x
    return x * (_poly(x2, _TANH_P) / _poly(x2, _TANH_Q))


def _tanh_saturate(x: mx.array, t: mx.array) -> mx.array:
    """+-1 exactly where the clamped x sits at the clamp (the ratio gives 0.9999997 there), else t."""
    return mx.where(x >= _TANH_CLAMP, 1.0, mx.where(x <= -_TANH_CLAMP, -1.0, t))


def _tanh_clamp(x: mx.array) -> mx.array:
    return _clamp(x, -_TANH_CLAMP, _TANH_CLAMP)


def _gelu_tanh_argument(x: mx.array) -> mx.array:
    return _tanh_clamp(_GELU_C * (x + _GELU_A * (x * x * x)))


def _gelu_from_tanh(x: mx.array, t: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + t)


# As for exp (see above), loops that end in their selects or have none: tanh is the clamp, the ratio, the
# saturation; GELU its clamped argument, the ratio, the saturation, 0.5 x (1 + t). 786 k values: tanh 2.2 -> 1.1 ms,
# GELU 2.6 -> 1.5 ms. (Traced inside a larger `mx.compile`, such as a training step, they fuse as MLX chooses.)
_tanh_clamp_fused = mx.compile(_tanh_clamp)
_tanh_ratio_fused = mx.compile(_tanh_ratio)
_tanh_saturate_fused = mx.compile(_tanh_saturate)
_gelu_tanh_argument_fused = mx.compile(_gelu_tanh_argument)
_gelu_from_tanh_fused = mx.compile(_gelu_from_tanh)


def _tanh_of_clamped_fused(u: mx.array) -> mx.array:
    return _tanh_saturate_fused(u, _tanh_ratio_fused(u))


def _tanh_fused(x: mx.array) -> mx.array:
    return _tanh_of_clamped_fused(_tanh_clamp_fused(x))


def _gelu_fused(x: mx.array) -> mx.array:
    return _gelu_from_tanh_fused(x, _tanh_of_clamped_fused(_gelu_tanh_argument_fused(x)))


@mx.compile
def _gelu_derivative_fused(x: mx.array) -> mx.array:
    u = _gelu_tanh_argument(x)
    t = _tanh_saturate(u, _tanh_ratio(u))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)


def _softmax(x: mx.array) -> mx.array:
    """Over the last axis: e^(x - max) / sum. The shift is MLX's own broadcast subtract, so that the exp's
    loops get one contiguous input (a broadcast operand makes MLX's compiled loop strided, and scalar)."""
    e = _exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


@mx.custom_function
def fast_exp(x: mx.array) -> mx.array:
    """e^x for float32 (see the module docstring for its error)."""
    return _exp(x)


@fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


@mx.custom_function
def fast_tanh(x: mx.array) -> mx.array:
    """tanh for float32 within 1e-6 relative."""
    return _tanh_fused(x)


@fast_tanh.vjp
def _fast_tanh_vjp(primals, cotangent, output):
    return (cotangent * (1.0 - output * output),)


@mx.custom_function
def fast_gelu_approx(x: mx.array) -> mx.array:
    """tanh-approximated GELU (`nn.gelu_approx`, transformers' gelu_pytorch_tanh); error in the module docstring."""
    return _gelu_fused(x)


@fast_gelu_approx.vjp
def _fast_gelu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    return (cotangent * _gelu_derivative_fused(x),)


@mx.custom_function
def _softmax_last(x: mx.array) -> mx.array:
    return _softmax(x)


@_softmax_last.vjp
def _softmax_last_vjp(primals, cotangent, output):
    return (output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True)),)


def fast_softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax over `axis` for float32 (see the module docstring for its error)."""
    if axis in (-1, x.ndim - 1):
        return _softmax_last(x)
    return mx.swapaxes(_softmax_last(mx.swapaxes(x, axis, -1)), axis, -1)


# --- the choice the models make -------------------------------------------------------------------------


def use_fast_math(x: mx.array) -> bool:
    """The approximations replace MLX's ops where MLX computes on the CPU, for float32 only: on any GPU
    (Metal, CUDA) MLX's own kernels are vectorised, and half precision would need other polynomials."""
    return x.dtype == mx.float32 and not accel.on_gpu() and _default_device_is_cpu()


def _default_device_is_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def gelu_approx(x: mx.array) -> mx.array:
    """tanh GELU: `fast_gelu_approx` on the CPU, `nn.gelu_approx` (looked up at call time) elsewhere."""
    return fast_gelu_approx(x) if use_fast_math(x) else nn.gelu_approx(x)


def tanh(x: mx.array) -> mx.array:
    return fast_tanh(x) if use_fast_math(x) else mx.tanh(x)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax accumulated in float32 (`precise=True` for half inputs on MLX's path)."""
    return fast_softmax(x, axis) if use_fast_math(x) else mx.softmax(x, axis=axis, precise=True)
