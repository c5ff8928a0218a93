"""Gemma 1 and Gemma 2 decoders in PyTorch, line for line with `models/gemma.py`.

Numerics follow transformers (the oracle): norms in float32 times (1 + w) before casting
back, RoPE tables computed in float32 and cast to the activations' dtype, Gemma 2 attention
scores scaled, soft-capped and masked in the activations' dtype with a float32 softmax.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


class RMSNorm(nn.Module):
    """Gemma's norm scales by (1 + w) in float32: zero-initialised weights mean identity."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() if x.dtype != torch.float64 else x
        return F.rms_norm(h, self.weight.shape, 1.0 + self.weight.to(h.dtype), self.eps).to(x.dtype)


class RoPE(nn.Module):
    """Split-half rotary embedding (`rotate_half`; MLX `traditional=False`), positions from `offset`.

    Positions start at 0 as in the MLX backend (transformers starts at 1); only the distance
    between query and key enters the scores.
    """

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims, self.base = dims, base

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        calc = torch.float64 if x.dtype == torch.float64 else torch.float32
        exponent = torch.arange(0, self.dims, 2, device=x.device, dtype=calc) / self.dims
        inv_freq = 1.0 / (self.base**exponent)
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=calc)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., : self.dims // 2], x[..., self.dims // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """(B, kv_heads, L, D) -> (B, kv_heads * repeats, L, D): query head h reads KV head h // repeats."""
    if repeats == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, repeats, L, D).reshape(B, H * repeats, L, D)


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
        self.rope = RoPE(self.head_dim, base=config.rope_theta)

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache: Optional[Any] = None
    ) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        repeats = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, repeats), repeat_kv(v, repeats)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            out = self._softcapped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))

    def _softcapped_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Gemma 2: cap * tanh(scores / cap) before the mask; SDPA has no soft-cap."""
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return weights @ v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


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

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache: Optional[Any] = None
    ) -> torch.Tensor:
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
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(hidden), the factor rounded to the weight dtype first (bf16: 45.25)."""
        h = self.embed_tokens(input_ids)
        return h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype, device=h.device)

    def forward(
        self, h: torch.Tensor, masks: dict[str, Optional[torch.Tensor]], cache: Optional[list] = None
    ) -> torch.Tensor:
        """Embeddings (B, L, D) -> final-normed hidden states; masks keyed "full" / "sliding"."""
        for i, layer in enumerate(self.layers):
            h = layer(h, masks["sliding" if layer.is_sliding else "full"], cache[i] if cache else None)
        return self.norm(h)

    def logits(self, h: torch.Tensor, lm_head: Optional[nn.Module] = None) -> torch.Tensor:
        """Head over the whole vocabulary (tied unless a separate one is given), then Gemma 2's soft-cap."""
        logits = lm_head(h) if lm_head is not None else F.linear(h, self.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
