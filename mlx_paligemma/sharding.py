"""Tensor parallelism: one PaliGemma split over the ranks of `mx.distributed` (Megatron-style).

Run under `mlx.launch -n N ...` and load with `mp.load(model, shard=True)`. Each rank then holds
1/N of every decoder layer and of the vocabulary:

- attention: q/k/v split by heads (column-split, `AllToShardedLinear`), o_proj split by its input
  (row-split, `ShardedToAllLinear`), so each block ends in one `all_sum`. When there are fewer KV
  heads than ranks (PaliGemma 1's multi-query attention has one), every rank keeps the KV head its
  query heads read, as vLLM and Megatron do: a copy of a small matrix instead of a refusal;
- MLP: gate/up column-split, down row-split: one `all_sum`;
- the tied embedding / LM head split by vocabulary rows: a token's embedding comes from the rank
  that holds its row (the others add zeros, one `all_sum`), and the logits are `all_gather`ed before
  Gemma 2's final soft-cap and sampling, so every rank sees the whole distribution.

The layers are MLX's own (`mlx.nn.layers.distributed.shard_linear`), float or quantized alike.
The vision tower and projector (~0.4 B parameters) stay whole on every rank unless
`shard_vision=True`. The model modules are not changed: a sharded layer only updates the head
counts its attention reshapes with. Every rank computes the same logits; generation then takes
rank 0's token on all ranks (`rank0_tokens`), so the ranks stay in step even when sampling.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_map

from .config import PaliGemmaConfig
from .errors import PaliGemmaError


def check_shardable(config: PaliGemmaConfig, ranks: int, shard_vision: bool = False) -> None:
    """Refuse, before any weight is read, a rank count the model's heads cannot be split over."""
    text = config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    if heads % ranks:
        raise PaliGemmaError(
            f"cannot split the language model's {heads} attention heads over {ranks} ranks: "
            f"use a rank count that divides {heads}"
        )
    if kv_heads % ranks and ranks % kv_heads:
        raise PaliGemmaError(
            f"cannot split the language model's {kv_heads} KV heads over {ranks} ranks: use a rank count "
            f"that divides {kv_heads} or a multiple of it (that divides {heads})"
        )
    if text.intermediate_size % ranks:
        raise PaliGemmaError(
            f"cannot split the MLP width {text.intermediate_size} over {ranks} ranks: use a rank count that divides it"
        )
    if shard_vision:
        vision = config.vision_config
        for what, size in (("attention heads", vision.num_attention_heads), ("MLP width", vision.intermediate_size)):
            if size % ranks:
                raise PaliGemmaError(
                    f"cannot split the vision tower's {size} {what} over {ranks} ranks (--shard-vision): "
                    f"use a rank count that divides {size}, or keep the vision tower whole"
                )


def shard_model(
    model: nn.Module, group: Optional[mx.distributed.Group] = None, shard_vision: bool = False
) -> nn.Module:
    """Split `model` (an MLX PaliGemma `Model`, float or quantized) over `group`, in place.

    Call it on a lazily loaded model (`load_model(..., lazy=True)`): every parameter is then a
    slice of a memory-mapped tensor, so each rank reads and keeps only its part. With a group of
    one it does nothing.
    """
    group = group or mx.distributed.init()
    ranks = group.size()
    if ranks == 1:
        return model
    check_shardable(model.config, ranks, shard_vision)
    for layer in model.language_model.layers:
        _shard_attention(layer.self_attn, group)
        _shard_mlp(layer.mlp, "gate_proj", "up_proj", "down_proj", group)
    lm = model.language_model
    lm.embed_tokens = VocabParallelEmbedding(lm.embed_tokens, group)
    if hasattr(model, "lm_head"):  # an untied head splits the same way
        model.lm_head = VocabParallelEmbedding(model.lm_head, group)
    if shard_vision:
        for layer in model.vision_tower.encoder.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
            attn.out_proj = _sharded_to_all(attn.out_proj, group)
            attn.num_heads //= ranks
            _shard_mlp(layer.mlp, "fc1", None, "fc2", group)
    model.shard_group = group
    return model


def _shard_attention(attn: nn.Module, group: mx.distributed.Group) -> None:
    ranks, rank = group.size(), group.rank()
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    if attn.n_kv_heads % ranks == 0:
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.n_kv_heads //= ranks
    else:  # fewer KV heads than ranks: keep the one this rank's query heads belong to
        kv = rank * attn.n_kv_heads // ranks
        rows = slice(kv * attn.head_dim, (kv + 1) * attn.head_dim)
        for proj in (attn.k_proj, attn.v_proj):
            proj.update(tree_map(lambda w: mx.contiguous(w[rows]), proj.parameters()))
        attn.n_kv_heads = 1
    attn.o_proj = _sharded_to_all(attn.o_proj, group)
    attn.n_heads //= ranks


def _shard_mlp(mlp: nn.Module, gate: str, up: Optional[str], down: str, group: mx.distributed.Group) -> None:
    for name in (gate, up):
        if name is not None:
            setattr(mlp, name, shard_linear(getattr(mlp, name), "all-to-sharded", group=group))
    setattr(mlp, down, _sharded_to_all(getattr(mlp, down), group))


def _sharded_to_all(linear: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """Row-split `linear` (its input dimension); a quantized one only where whole groups land on each rank."""
    if isinstance(linear, nn.QuantizedLinear):
        width = linear.weight.shape[1] * 32 // linear.bits
        if (width // group.size()) % linear.group_size:
            raise PaliGemmaError(
                f"cannot split a {width}-wide quantized layer over {group.size()} ranks: each rank's "
                f"{width // group.size()} columns are not whole groups of {linear.group_size} (quantize with a "
                f"smaller --group-size, or shard the float checkpoint)"
            )
    return shard_linear(linear, "sharded-to-all", group=group)


class VocabParallelEmbedding(nn.Module):
    """A tied embedding / LM head (or untied head) holding this rank's rows of the vocabulary.

    As a lookup: each rank embeds the tokens whose rows it holds, zeros elsewhere, and one
    `all_sum` gives every rank the full embeddings. As the head (`as_linear`, or a call on
    hidden states for an untied `lm_head`): each rank scores its rows and `all_gather` assembles
    the full logits, identical on every rank. A vocabulary the rank count does not divide is
    padded with zero rows, whose logits are cut before anyone sees them.
    """

    def __init__(self, full: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.group = group
        ranks, rank = group.size(), group.rank()
        self.vocab_size = full.weight.shape[0]
        self.rows = -(-self.vocab_size // ranks)
        self.start = rank * self.rows
        self.is_head = isinstance(full, (nn.Linear, nn.QuantizedLinear))
        pad = self.rows * ranks - self.vocab_size

        def local(w: mx.array) -> mx.array:
            if pad:
                w = mx.concatenate([w, mx.zeros((pad, *w.shape[1:]), w.dtype)])
            return mx.contiguous(w[self.start : self.start + self.rows])

        full.update(tree_map(local, full.parameters()))
        self.local = full

    def _lookup(self, input_ids: mx.array) -> mx.array:
        ids = input_ids - self.start
        mine = (ids >= 0) & (ids < self.rows)
        h = self.local(mx.where(mine, ids, 0))
        return mx.distributed.all_sum(mx.where(mine[..., None], h, mx.zeros_like(h)), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        part = self.local(x) if self.is_head else self.local.as_linear(x)  # (..., rows)
        full = mx.distributed.all_gather(mx.moveaxis(part, -1, 0), group=self.group)  # (ranks * rows, ...)
        return mx.moveaxis(full, 0, -1)[..., : self.vocab_size]

    def __call__(self, x: mx.array) -> mx.array:
        return self.as_linear(x) if self.is_head else self._lookup(x)


def shard_group(model: Any) -> Optional[mx.distributed.Group]:
    """The group a model was split over by `shard_model`, or None."""
    return getattr(model, "shard_group", None)


def rank0_tokens(model: Any, tokens: mx.array) -> mx.array:
    """Rank 0's sampled tokens on every rank of a sharded model (unchanged otherwise).

    The ranks see identical logits, so greedy tokens agree anyway; a sampled token agrees only if
    every rank's random state does. Taking rank 0's choice (one tiny `all_sum` per step) keeps the
    ranks in step whatever the sampler, so none waits forever in a collective the others left.
    """
    group = shard_group(model)
    if group is None:
        return tokens
    # `tokens * 0`, not fresh zeros: every rank must build the same graph, or a rank whose sum does not
    # depend on its forward pass may run it before the layers' collectives, and the ranks deadlock.
    return mx.distributed.all_sum(tokens * int(group.rank() == 0), group=group)
