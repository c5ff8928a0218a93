"""Gemma 1 and Gemma 2 decoders, one module tree for both.

Gemma 2 adds: attention scale query_pre_attn_scalar^-0.5, attention-logit soft-capping before
the mask, sliding-window layers, post-attention / pre- and post-feed-forward norms, and a
final logit soft-cap. Everything stays in the weights' dtype; only norms and softmax
accumulate in float32 (inside the fused kernels), as in the reference.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import TextConfig
from . import fast_math


class RMSNorm(nn.Module):
    """Gemma's norm scales by (1 + w): zero-initialised weights mean identity.

    `weight` stays the checkpoint's w, so every save writes the original format; the scale 1 + w is
    computed once per weight array, not in every call of every decode step. It is kept outside the
    module's tree (a plain attribute: not a parameter, not in `state`, never saved or compiled in)
    together with the array it came from: a new weight (loading, an optimizer step, a dtype change,
    autodiff's and mx.compile's tracers) is a new array, and the scale is recomputed from it.
    """

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    @property
    def scale(self) -> mx.array:
        folded = self.__dict__.get("_folded")
        if folded is None or folded[0] is not self.weight:
            folded = (self.weight, 1.0 + self.weight)
            object.__setattr__(self, "_folded", folded)  # bypasses Module's tree on purpose
        return folded[1]

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.scale, self.eps)


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        dim, self.head_dim = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=config.rope_theta)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.rope_offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # The CPU prefill takes the matmul path for its softmax (fast_math's); decode steps keep the fused op.
        if self.softcap is None and not (L > 1 and fast_math.use_fast_math(q)):
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            out = self._matmul_attention(q, k, v, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _matmul_attention(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array]) -> mx.array:
        """Attention as matmul, softmax, matmul, grouped by KV head: Gemma 2 soft-caps the scores,
        cap * tanh(scores / cap), before the mask, which the fused kernel cannot do. A masked score
        becomes float32's lowest value, so its weight is exactly 0, as in the fused kernel."""
        B, _, L, D = q.shape
        repeats = self.n_heads // self.n_kv_heads
        q = (q * self.scale).reshape(B, self.n_kv_heads, repeats, L, D)
        scores = q @ mx.expand_dims(k, 2).swapaxes(-1, -2)
        if self.softcap is not None:
            scores = fast_math.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = mx.where(mx.expand_dims(mask, 2), scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        weights = fast_math.softmax(scores, axis=-1)
        return (weights @ mx.expand_dims(v, 2)).reshape(B, self.n_heads, L, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fast_math.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.is_gemma2 = config.is_gemma2
        self.is_sliding = config.is_sliding(layer)
        self.self_attn = Attention(config)
        self.mlp = MLP(dim, config.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        if self.is_gemma2:
            self.pre_feedforward_layernorm = RMSNorm(dim, eps)
            self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        r = self.self_attn(self.input_layernorm(x), mask, cache)
        if not self.is_gemma2:
            h = x + r
            return h + self.mlp(self.post_attention_layernorm(h))
        h = x + self.post_attention_layernorm(r)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class LanguageModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        """Token embeddings times sqrt(hidden), the factor rounded to the weight dtype first (bf16: 45.25)."""
        h = self.embed_tokens(input_ids)
        return h * mx.array(self.config.hidden_size**0.5, dtype=h.dtype)

    def __call__(self, h: mx.array, masks: dict[str, Optional[mx.array]], cache: Optional[list] = None) -> mx.array:
        """Embeddings (B, L, D) -> final-normed hidden states; masks keyed "full" / "sliding"."""
        for i, layer in enumerate(self.layers):
            h = layer(h, masks["sliding" if layer.is_sliding else "full"], cache[i] if cache else None)
        return self.norm(h)

    def logits(self, h: mx.array, lm_head: Optional[nn.Module] = None) -> mx.array:
        """Head over the whole vocabulary (tied unless a separate one is given), then Gemma 2's soft-cap."""
        logits = lm_head(h) if lm_head is not None else self.embed_tokens.as_linear(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = fast_math.tanh(logits / cap) * cap
        return logits
