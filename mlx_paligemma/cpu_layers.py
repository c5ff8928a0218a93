"""Frozen layers that keep their weights small in memory and compute in float32 on the CPU.

MLX's CPU kernels for quantized and half-precision matrix products are scalar: a 256x2048 by
2048x4096 product takes ~1.9 s with `quantized_matmul`, 0.07 s as `dequantize` (in 8 MB slices) +
a float32 BLAS matmul, 0.03 s in float32 (`python -m benchmarks.bench_quantized_matmul`). So on the
CPU, products with several rows (prefill, training, batched decode) dequantize (or cast) the
weight into float32 temporaries and use the BLAS; one-row products (decode) keep
`quantized_matmul`, which wins there (no temporary).
On the GPU every layer is exactly its MLX parent.

The layers are subclasses with the parents' parameters and no others, swapped in by changing
the class of a loaded module (`use_cpu_layers`): checkpoints, LoRA wrapping (`LoRALinear` wraps
them like any `nn.QuantizedLinear`), `tree_flatten` and saving see the same names and arrays.

The float32 weight never outlives its product: the gradient with respect to the input (QLoRA
and LoRA on a half-precision base need it) recomputes it in the backward pass
(`mx.custom_function`), instead of letting autodiff keep every layer's float32 copy alive from
the forward pass to the backward, which would cost the float32 model in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

# From this many rows a dequantize + float32 BLAS product beats `quantized_matmul` on the CPU
# (4/8 bits, group sizes 32-128: 1.1-1.8x faster at 4 rows, 2.3-2.9x at 8, ~26x at 256; slower at 1-2).
DEQUANTIZE_MIN_ROWS = 4
# From this many weight elements a quantized product that keeps `quantized_matmul` on the CPU (1-3 rows:
# decode, the LM head of the last prefill position; or a mode without the dequantize path) runs as two
# half products on two streams: MLX's CPU kernel is single-threaded (the 257k x 1024 4-bit LM head alone:
# 275 -> 141 ms), and the split is exact row by row.
SPLIT_MIN_QUANTIZED = 2**22
# Rows of a weight made float32 at a time (in elements: 8 MB of float32). A 257k-row embedding used as
# the LM head is dequantized in slices rather than at once (2.1 GB for the 3B model's); MLX's CPU
# `dequantize` materialises about four float32-sized temporaries per slice (measured), so the
# transient is ~32 MB whatever the layer.
CHUNK_ELEMENTS = 2**21
HALF = (mx.bfloat16, mx.float16)


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def _rows(x: mx.array) -> int:
    return x.size // max(x.shape[-1], 1)


@functools.cache
def helper_stream() -> mx.Stream:
    """A second CPU stream for the calling thread (`mx.new_thread_local_stream`: each thread gets its own,
    as MLX streams belong to the thread that made them). Only MLX's own quantized kernels run on it,
    never the BLAS: a second thread calling MKL slows the first one's MKL calls for
    the rest of the process (see `engine.engine_stream`). Measured, a (256-261) x 1024 by 1024 x 4096 GEMM before
    and after work on it: 22.3 and 22.0 ms (after dequantizing), 19.2 and 21.6 ms (after quantized
    products), within this 2-core machine's run-to-run spread; decode is faster with it (README)."""
    return mx.new_thread_local_stream(mx.cpu)


# How a weight slice is made float32: (first row, end row, the array it must wait for) -> float32 rows.
WeightSlice = Callable[[int, int, mx.array], mx.array]


def _sliced_product(x: mx.array, weight_slice: WeightSlice, out_rows: int, in_dims: int) -> mx.array:
    """`x @ W.T` with W (out_rows, in_dims) made float32 a slice of rows at a time.

    Each slice waits (`mx.depends`) for the input, then for the previous slice's product: MLX
    evaluates independent nodes breadth first (up to MLX_BFS_MAX_WIDTH at once), which would
    otherwise dequantize every slice, and every layer's weight, before the first product.
    """
    step = max(1, CHUNK_ELEMENTS // max(in_dims, 1))
    parts, after = [], x
    for s in range(0, out_rows, step):
        parts.append(x @ weight_slice(s, min(s + step, out_rows), after).T)
        after = parts[-1]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _sliced_input_grad(g: mx.array, weight_slice: WeightSlice, out_rows: int, in_dims: int) -> mx.array:
    """`g @ W` (the input gradient of `x @ W.T`), W made float32 a slice of rows at a time, in order."""
    step = max(1, CHUNK_ELEMENTS // max(in_dims, 1))
    total = None
    for s in range(0, out_rows, step):
        e = min(s + step, out_rows)
        part = g[..., s:e] @ weight_slice(s, e, g if total is None else total)
        total = part if total is None else total + part
    return total


@functools.cache
def _unpack(bits: int) -> Callable:
    """codes * scale + bias for words (..., groups, words per group, 1) and scales/biases (..., groups, 1, 1),
    compiled: on the CPU `mx.compile` fuses the shift, mask, cast and multiply-add into one loop that writes
    only the float32 output (4096 x 1024 at 4 bits: 4.1 ms against 5.0 ms unfused)."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    mask = (1 << bits) - 1

    def unpack(words: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        return ((words >> shifts) & mask).astype(mx.float32) * scales + biases

    return mx.compile(unpack)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int, mode: str) -> mx.array:
    """`mx.dequantize`, bit for bit; for 2/4/8-bit affine weights with float32 scales as shifts, masks and one
    multiply-add in one compiled loop, which MLX's CPU runs ~2.3x as fast as its dequantize kernel (4096 x 1024
    at 4 bits: 4.1 ms against 9.6 ms; a float32 GEMM of 260 rows by it takes 6.5 ms, so this is most of the
    quantized overhead)."""
    if mode != "affine" or bits not in (2, 4, 8) or scales.dtype != mx.float32:
        return mx.dequantize(w, scales, biases, group_size, bits, mode=mode)
    per_word = 32 // bits
    rows, groups = w.shape[:-1], scales.shape[-1]
    words = w.reshape(*rows, groups, group_size // per_word, 1)  # low bits first within each word
    out = _unpack(bits)(words, scales[..., None, None], biases[..., None, None])
    return out.reshape(*rows, w.shape[-1] * per_word)


@functools.cache
def dequantized_matmul(group_size: int, bits: int, mode: str = "affine") -> Callable:
    """`f(x, w, scales, biases) = x @ dequantize(w).T` in x's dtype, with the input gradient recomputing
    the dequantized weight (no gradient flows to the frozen quantized weight)."""

    def weight_slice(w, scales, biases, dtype):
        def get(s: int, e: int, after: mx.array) -> mx.array:
            ws, ss, bs = mx.depends([w[s:e], scales[s:e], biases[s:e]], after)
            return dequantize(ws, ss, bs, group_size, bits, mode).astype(dtype)

        return get

    @mx.custom_function
    def product(x, w, scales, biases):
        in_dims = w.shape[-1] * 32 // bits
        return _sliced_product(x, weight_slice(w, scales, biases, x.dtype), w.shape[0], in_dims)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        in_dims = w.shape[-1] * 32 // bits
        dx = _sliced_input_grad(cotangent, weight_slice(w, scales, biases, x.dtype), w.shape[0], in_dims)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return product


def _cast_slice(weight: mx.array, dtype: mx.Dtype) -> WeightSlice:
    return lambda s, e, after: mx.depends(weight[s:e], after).astype(dtype)


@mx.custom_function
def cast_matmul(x: mx.array, weight: mx.array) -> mx.array:
    """`x @ weight.T` with the (half-precision) weight cast to x's dtype per call; the input gradient
    casts it again instead of keeping the float32 copy from the forward pass."""
    return _sliced_product(x, _cast_slice(weight, x.dtype), *weight.shape)


@cast_matmul.vjp
def _cast_matmul_vjp(primals, cotangent, output):
    x, weight = primals
    dx = _sliced_input_grad(cotangent, _cast_slice(weight, x.dtype), *weight.shape)
    return dx, mx.zeros_like(weight)


def _uses_dequantize(layer: nn.Module, x: mx.array) -> bool:
    return on_cpu() and layer.mode == "affine" and "biases" in layer and _rows(x) >= DEQUANTIZE_MIN_ROWS


def _quantized_product(layer: nn.Module, x: mx.array) -> mx.array:
    """`x @ dequantize(W).T` by `quantized_matmul`; on the CPU, for a large weight, as two half products on
    two streams (the same numbers: each output element is computed as in the whole product)."""
    w, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    kw = dict(transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    if not on_cpu() or w.size * (32 // layer.bits) < SPLIT_MIN_QUANTIZED or w.shape[0] < 2:
        return mx.quantized_matmul(x, w, scales, biases, **kw)
    h = w.shape[0] // 2
    cut = lambda a, part: None if a is None else a[part]  # noqa: E731
    top = mx.quantized_matmul(x, w[:h], scales[:h], cut(biases, slice(None, h)), **kw)
    with mx.stream(helper_stream()):
        bottom = mx.quantized_matmul(x, w[h:], scales[h:], cut(biases, slice(h, None)), **kw)
    return mx.concatenate([top, bottom], axis=-1)


class CPUQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear`; on the CPU, many-row products dequantize into float32 and use the BLAS."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _uses_dequantize(self, x):
            y = _quantized_product(self, x)
            return y + self["bias"] if "bias" in self else y
        y = dequantized_matmul(self.group_size, self.bits, self.mode)(x, self["weight"], self["scales"], self["biases"])
        if "bias" in self:
            y = y + self["bias"].astype(y.dtype)
        return y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding`; used as the (tied) LM head on the CPU with many rows, it is dequantized
    a slice of the vocabulary at a time into float32 for the BLAS."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _uses_dequantize(self, x):
            return _quantized_product(self, x)
        return dequantized_matmul(self.group_size, self.bits, self.mode)(
            x, self["weight"], self["scales"], self["biases"]
        )


class CastLinear(nn.Linear):
    """`nn.Linear` whose weight stays half precision in memory; on the CPU a float32 input is multiplied
    by the weight cast to float32 per call (MLX's CPU bf16/f16 matmuls are scalar)."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self["weight"]
        if not on_cpu() or w.dtype == x.dtype:
            return super().__call__(x)
        y = cast_matmul(x, w)
        if "bias" in self:
            y = y + self["bias"].astype(y.dtype)
        return y


class CastEmbedding(nn.Embedding):
    """`nn.Embedding` with a half-precision table; on the CPU its rows come out float32 and, as the LM
    head, it is cast a slice of the vocabulary at a time."""

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        return y.astype(mx.float32) if on_cpu() and y.dtype in HALF else y

    def as_linear(self, x: mx.array) -> mx.array:
        w = self["weight"]
        if not on_cpu() or w.dtype == x.dtype:
            return super().as_linear(x)
        return cast_matmul(x, w)


_QUANTIZED_SWAPS = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
_HALF_SWAPS = {nn.Linear: CastLinear, nn.Embedding: CastEmbedding}


def use_cpu_layers(model: nn.Module, half_weights: bool = False) -> nn.Module:
    """Give every quantized linear and embedding of `model` its CPU-aware subclass, in place; with
    `half_weights` (a half-precision base computing in float32) the plain ones too.

    Only the class changes (the parameters and their names stay), so this is invisible to saving,
    LoRA and `nn.quantize`'s class checks. Returns `model`.
    """
    swaps = {**_QUANTIZED_SWAPS, **(_HALF_SWAPS if half_weights else {})}
    for _, module in model.named_modules():
        cpu_class = swaps.get(type(module))
        if cpu_class is not None:
            module.__class__ = cpu_class
    return model
