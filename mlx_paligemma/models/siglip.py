"""SigLIP vision tower (So400m in PaliGemma): patch conv, learned positions, pre-LN encoder.

No CLS token and no pooling head: PaliGemma feeds every patch embedding to the projector.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..checkpoint import patch_conv_layout
from ..config import VisionConfig
from . import fast_math


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = self.core(q, k, v)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def core(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """softmax(q k^T scale) v, no mask: on the CPU as matmul, fast_math's softmax, matmul; else the fused op."""
        if fast_math.use_fast_math(q):
            return fast_math.softmax((q * self.scale) @ k.swapaxes(-1, -2), axis=-1) @ v
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(fast_math.gelu_approx(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=True
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def __call__(self, pixel_values_nhwc: mx.array) -> mx.array:
        """The stride-p, p x p convolution as one matmul: cut the image into its (p, p, C) patches, row-major,
        and multiply by the kernel flattened in the same order (the stored conv weight is left as it is)."""
        conv = self.patch_embedding
        p = conv.weight.shape[1]
        B, H, W, C = pixel_values_nhwc.shape
        H, W = H - H % p, W - W % p  # the convolution leaves out a partial last row/column of patches
        patches = pixel_values_nhwc[:, :H, :W].reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(B, (H // p) * (W // p), p * p * C)
        kernel = conv.weight.reshape(conv.weight.shape[0], -1)  # (D, p, p, C) -> (D, p*p*C)
        return mx.addmm(conv.bias, patches, kernel.T) + self.position_embedding.weight


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(B, 3, H, W) pixels (channels first, as the processor makes them) -> (B, N, D)."""
        dtype = self.embeddings.patch_embedding.weight.dtype
        x = self.embeddings(pixel_values.transpose(0, 2, 3, 1).astype(dtype))
        return self.post_layernorm(self.encoder(x))

    def sanitize(self, weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
        """PyTorch stores the patch conv as (O, I, kh, kw); MLX wants (O, kh, kw, I).

        Checkpoints converted by mlx-vlm are already transposed, recognised by the last axis.
        """
        key = f"{prefix}embeddings.patch_embedding.weight"
        w = weights.get(key)
        if w is not None and w.ndim == 4 and patch_conv_layout(w.shape, self.config.num_channels) == "OIHW":
            weights[key] = w.transpose(0, 2, 3, 1)
        return weights
