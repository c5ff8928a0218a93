"""KV cache and prefix-LM masks of the PyTorch backend, line for line with `models/cache.py`.

The prefix is prefilled once, then one token per decode step.

Each layer keeps its keys and values in sequence order. Gemma 2 sliding layers keep only the
last `sliding_window` positions once a call is done, which is all a later suffix token may
see; during the prefill call they still see the whole prefix, which is bidirectional across
the window in the reference. Because slots stay in order, the positions they hold follow
from two numbers (how many positions so far, how many kept), so the mask needs no bookkeeping
of its own, unlike a rotating buffer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import TextConfig
from ..errors import PaliGemmaError


def prefix_lm_masks(
    attention_mask: torch.Tensor,
    token_type_ids: Optional[torch.Tensor],
    sliding_window: Optional[int],
    query_positions: Optional[torch.Tensor] = None,
    key_positions: Optional[torch.Tensor] = None,
) -> dict[str, Optional[torch.Tensor]]:
    """Boolean (B, 1, Lq, Lk) masks, True where a query may attend a key.

    Without positions, queries and keys are the L input tokens. With a cache, `key_positions`
    says which absolute position each cached slot holds and `attention_mask` covers every
    position so far; `token_type_ids` then describes the queries, which after prefill are
    always suffix tokens (None). The diagonal, a token seeing itself, is always open, so
    padded query rows never meet an all-masked softmax.
    """
    L, device = attention_mask.shape[1], attention_mask.device
    q = torch.arange(L, device=device) if query_positions is None else query_positions
    k = torch.arange(L, device=device) if key_positions is None else key_positions
    q, k = q[:, None], k[None, :]
    causal = k <= q
    keep = attention_mask.bool()[:, k[0]][:, None, :]  # (B, 1, Lk)
    if token_type_ids is not None:
        prefix = token_type_ids == 0
        both_prefix = prefix[:, :, None] & prefix[:, None, :]  # prefill: Lq == Lk
    else:
        both_prefix = torch.zeros((1, 1, 1), dtype=torch.bool, device=device)
    diagonal = q == k
    masks = {"full": (((causal | both_prefix) & keep) | diagonal)[:, None], "sliding": None}
    if sliding_window is not None:
        window = causal & (q - k < sliding_window)
        masks["sliding"] = (((window | both_prefix) & keep) | diagonal)[:, None]
    return masks


class LayerCache:
    """One layer's keys and values, (B, kv_heads, positions, head_dim); `window` bounds sliding layers."""

    def __init__(self, window: Optional[int] = None):
        self.window = window
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.offset = 0  # positions seen so far (the RoPE offset)

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values and return everything the call's queries may attend."""
        self.offset += keys.shape[2]
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        if self.window is not None and keys.shape[2] > self.window:
            # A copy, not a view: a view would keep the whole prefill alive.
            self.keys, self.values = keys[:, :, -self.window :].clone(), values[:, :, -self.window :].clone()
        return keys, values

    @property
    def stored(self) -> int:
        """Positions held, the last `stored` of `offset`."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


class PrefixLMCache:
    """Caches for every layer plus the attention mask of every position so far.

    The first call is the prefill (any mix of prefix and suffix tokens, masked as in the full
    forward); every later call appends suffix tokens, which attend causally.
    """

    def __init__(self, config: TextConfig, attention_mask: Any = None):
        self.window = config.sliding_window
        self.layers = [
            LayerCache(self.window if config.is_sliding(i) else None) for i in range(config.num_hidden_layers)
        ]
        self.attention_mask: Optional[torch.Tensor] = None  # (B, positions so far)
        # The prefill's padding mask, when known before the prefill (the generation loop's case).
        self.prefill_mask = attention_mask  # converted by the model like any input

    @property
    def offset(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def masks(
        self, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor]
    ) -> dict[str, Optional[torch.Tensor]]:
        """Register this call's tokens and return its (B, 1, new, keys) masks, keyed "full" / "sliding".

        `attention_mask` covers this call's tokens only (earlier ones are remembered here);
        `token_type_ids` only matters for the prefill: later tokens are suffix tokens.
        """
        start, new = self.offset, attention_mask.shape[1]
        if start and token_type_ids is not None and bool((token_type_ids == 0).any()):
            raise PaliGemmaError(
                "after the prefill, a cached call may only add suffix tokens "
                "(token_type_ids 1): prefill the whole prefix in one call, since "
                "prefix tokens attend to each other bidirectionally"
            )
        self.attention_mask = attention_mask if start == 0 else torch.cat([self.attention_mask, attention_mask], 1)
        types = token_type_ids if start == 0 else None
        device = attention_mask.device
        query = torch.arange(start, start + new, device=device)
        every = torch.arange(start + new, device=device)
        masks = prefix_lm_masks(self.attention_mask, types, self.window, query, every)
        kept = self._sliding_slots()  # positions the sliding layers still hold from earlier calls
        if self.window is not None and kept < start:
            keys = torch.arange(start - kept, start + new, device=device)
            masks["sliding"] = prefix_lm_masks(self.attention_mask, None, self.window, query, keys)["sliding"]
        return masks

    def _sliding_slots(self) -> int:
        return next((layer.stored for layer in self.layers if layer.window is not None), 0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order): rows that finished leave the batch."""
        index = torch.tensor(keep, device=self.attention_mask.device)
        self.attention_mask = self.attention_mask[index]
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
