"""The CPU layers (mlx_paligemma/cpu_layers.py) give MLX's own results: quantized layers equal
`nn.QuantizedLinear` / `nn.QuantizedEmbedding` (forward and input gradient), half-precision ones
equal a float32 layer holding the same (upcast) weight.

Tolerance, measured: max |diff| / max |reference| <= 1.2e-6 (forward) and 1.0e-6 (input gradient)
over 4/8 bits and group sizes 32/64/128 (float32 summation order: BLAS vs MLX's kernel); 1e-5 here.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_paligemma import cpu_layers
from mlx_paligemma.cpu_layers import CastEmbedding, CastLinear, CPUQuantizedEmbedding, CPUQuantizedLinear

RTOL = 1e-5


def _close(got: mx.array, ref: mx.array) -> None:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()


def _pair(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The MLX layer and a copy of it with the CPU class (same arrays)."""
    twin = type(layer).__new__(type(layer))
    twin.__dict__.update(layer.__dict__)
    dict.update(twin, layer)
    cpu_layers.use_cpu_layers(twin, half_weights=True)
    return layer, twin


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [2, 40])  # below and above DEQUANTIZE_MIN_ROWS
def test_quantized_linear_equals_mlx(bits, group_size, rows):
    mx.random.seed(bits * group_size + rows)
    ref, cpu = _pair(nn.QuantizedLinear.from_linear(nn.Linear(256, 384, bias=True), group_size, bits))
    assert type(cpu) is CPUQuantizedLinear
    x = mx.random.normal((2, rows // 2, 256))
    assert cpu_layers._uses_dequantize(cpu, x) == (rows >= cpu_layers.DEQUANTIZE_MIN_ROWS)
    _close(cpu(x), ref(x))
    loss = lambda layer: lambda x: (layer(x) * mx.arange(384)).sum()  # noqa: E731
    _close(mx.grad(loss(cpu))(x), mx.grad(loss(ref))(x))
    _close(mx.compile(mx.grad(loss(cpu)))(x), mx.grad(loss(ref))(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_head_equals_mlx_in_slices(bits, monkeypatch):
    """As the tied LM head the table is dequantized a slice of rows at a time (slices forced small here)."""
    monkeypatch.setattr(cpu_layers, "CHUNK_ELEMENTS", 64 * 100)  # 100-row slices of a 1000-row table
    mx.random.seed(bits)
    ref, cpu = _pair(nn.QuantizedEmbedding.from_embedding(nn.Embedding(1000, 64), 32, bits))
    assert type(cpu) is CPUQuantizedEmbedding
    x = mx.random.normal((2, 12, 64))
    _close(cpu.as_linear(x), ref.as_linear(x))
    loss = lambda emb: lambda x: (emb.as_linear(x) ** 2).sum()  # noqa: E731
    _close(mx.grad(loss(cpu))(x), mx.grad(loss(ref))(x))
    ids = mx.array([[1, 5, 999]])
    _close(cpu(ids), ref(ids))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_linear_computes_like_float32(dtype):
    mx.random.seed(0)
    half = nn.Linear(96, 80)
    half.set_dtype(dtype)
    full = nn.Linear(96, 80)
    full.update({k: v.astype(mx.float32) for k, v in half.parameters().items()})
    _, cast = _pair(half)
    assert type(cast) is CastLinear and cast.weight.dtype == dtype
    x = mx.random.normal((5, 96))
    y = cast(x)
    assert y.dtype == mx.float32
    _close(y, full(x))
    loss = lambda layer: lambda x: (layer(x) ** 2).sum()  # noqa: E731
    _close(mx.grad(loss(cast))(x), mx.grad(loss(full))(x))

    emb = nn.Embedding(50, 96)
    emb.set_dtype(dtype)
    _, cast_emb = _pair(emb)
    assert type(cast_emb) is CastEmbedding and cast_emb(mx.array([3])).dtype == mx.float32
    _close(cast_emb.as_linear(x), x @ emb.weight.astype(mx.float32).T)


def test_swapping_keeps_every_parameter_name_and_array():
    model = nn.Sequential(nn.Linear(64, 64), nn.Embedding(10, 64))
    nn.quantize(model, 32, 4)
    before = dict(tree_flatten(model.parameters()))
    cpu_layers.use_cpu_layers(model)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys() and all(after[k] is before[k] for k in before)
    assert isinstance(model.layers[0], nn.QuantizedLinear) and type(model.layers[0]) is CPUQuantizedLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fast_dequantize_is_mlx_dequantize_bit_for_bit(bits, dtype):
    """The shift-and-mask unpacking (2/4/8-bit affine, float32 scales; MLX's kernel otherwise) against
    `mx.dequantize` itself, every group size, a row count that is not a power of two."""
    from mlx_paligemma.cpu_layers import dequantize

    for group_size in (32, 64, 128):
        w = (mx.random.normal((37, 256), key=mx.random.key(bits)) * 3).astype(getattr(mx, dtype))
        q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        expected = mx.dequantize(q, scales, biases, group_size=group_size, bits=bits)
        got = dequantize(q, scales, biases, group_size, bits, "affine")
        assert got.dtype == expected.dtype and mx.array_equal(got, expected).item(), (group_size, bits, dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 40])  # one-row products (decode, the LM head), a dequantized one
def test_two_stream_halves_equal_mlx(bits, rows, monkeypatch):
    """Few-row products of large quantized weights run as two halves, the second on a helper stream
    (threshold forced low here): the results stay MLX's, compiled and differentiated too, and the helper
    stream is used; with many rows (dequantize + BLAS) it is not."""
    monkeypatch.setattr(cpu_layers, "SPLIT_MIN_QUANTIZED", 1)
    used = []
    real = cpu_layers.helper_stream
    monkeypatch.setattr(cpu_layers, "helper_stream", lambda: used.append(1) or real())
    mx.random.seed(bits + rows)
    ref, cpu = _pair(nn.QuantizedLinear.from_linear(nn.Linear(256, 385, bias=True), 64, bits))  # odd rows
    x = mx.random.normal((rows, 256))
    _close(cpu(x), ref(x))
    loss = lambda layer: lambda x: (layer(x) * mx.arange(385)).sum()  # noqa: E731
    _close(mx.compile(mx.grad(loss(cpu)))(x), mx.grad(loss(ref))(x))
    ref_e, cpu_e = _pair(nn.QuantizedEmbedding.from_embedding(nn.Embedding(999, 64), 32, bits))
    h = mx.random.normal((1, rows, 64))
    _close(cpu_e.as_linear(h), ref_e.as_linear(h))
    assert bool(used) == (rows < cpu_layers.DEQUANTIZE_MIN_ROWS)


def test_the_helper_stream_belongs_to_each_thread():
    """A thread's ops run on its own helper stream (MLX streams belong to the thread that made them)."""
    import threading

    mx.random.seed(3)
    ref, cpu = _pair(nn.QuantizedLinear.from_linear(nn.Linear(2048, 2048, bias=False), 64, 4))
    x = mx.random.normal((1, 2048))
    assert cpu["weight"].size * 8 >= cpu_layers.SPLIT_MIN_QUANTIZED  # the real threshold splits it
    want = np.asarray(ref(x))
    got = {}

    def work(name):
        got[name] = np.asarray(cpu(x))

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    work("main")
    for name, value in got.items():
        assert np.abs(value - want).max() <= RTOL * np.abs(want).max(), name
