"""KV cache and prefix-LM masks of the MLX backend, line for line with `reference/cache.py`.

The prefix (image + prompt) is prefilled once, then one suffix token per decode step. Each
layer keeps its keys and values in sequence order. Gemma 2 sliding layers keep only the last
`sliding_window` positions once a call is done, which is all a later suffix token may see;
during the prefill call they still see the whole prefix, which is bidirectional across the
window in the reference. Because slots stay in order, the positions they hold follow from two
numbers (how many positions so far, how many held), so the mask needs no bookkeeping of its own.

Written here rather than taken from mlx-lm: `mlx_lm.models.cache` imports the `mlx_lm` package,
which imports transformers (~2.4 s on first use), and its rotating cache reorders slots.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from ..config import TextConfig
from ..errors import PaliGemmaError


def prefix_lm_masks(
    attention_mask: mx.array,
    token_type_ids: Optional[mx.array],
    sliding_window: Optional[int],
    query_positions: Optional[mx.array] = None,
    key_positions: Optional[mx.array] = None,
) -> dict[str, Optional[mx.array]]:
    """Boolean (B, 1, Lq, Lk) masks, True where a query may attend a key.

    Without positions, queries and keys are the L input tokens. With a cache, `key_positions`
    says which absolute position each cached slot holds and `attention_mask` covers every
    position so far; `token_type_ids` then describes the queries, which after prefill are
    always suffix tokens (None). The diagonal, a token seeing itself, is always open, so
    padded query rows never meet an all-masked softmax.
    """
    L = attention_mask.shape[1]
    q = mx.arange(L) if query_positions is None else query_positions
    k = mx.arange(L) if key_positions is None else key_positions
    q, k = q[:, None], k[None, :]
    causal = k <= q
    keep = mx.take(attention_mask.astype(mx.bool_), k[0], axis=1)[:, None, :]  # (B, 1, Lk)
    if token_type_ids is not None:
        prefix = token_type_ids == 0
        both_prefix = prefix[:, :, None] & prefix[:, None, :]  # prefill: Lq == Lk
    else:
        both_prefix = mx.zeros((1, 1, 1), mx.bool_)
    diagonal = q == k
    masks = {"full": (((causal | both_prefix) & keep) | diagonal)[:, None], "sliding": None}
    if sliding_window is not None:
        window = causal & (q - k < sliding_window)
        masks["sliding"] = (((window | both_prefix) & keep) | diagonal)[:, None]
    return masks


class LayerCache:
    """One layer's keys and values, (B, kv_heads, positions, head_dim); `window` bounds sliding layers.

    Slots grow in a preallocated buffer, `step` positions at a time (as mlx-lm's KVCache does), so
    a decode step writes one slot instead of copying the history. A sliding layer drops its
    oldest slots once it holds `step` more than its window (one copy every `step` tokens, not
    every token); the mask hides the extra slots, which are outside every later query's window.
    """

    step = 256

    def __init__(self, window: Optional[int] = None):
        self.window = window
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # positions seen so far (the RoPE offset)
        self.first = 0  # the position held in slot 0 (> 0 once a sliding layer dropped slots)

    @property
    def stored(self) -> int:
        """Positions held, the last `stored` of `offset`."""
        return self.offset - self.first

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append this call's keys/values and return everything the call's queries may attend."""
        prev, new = self.stored, keys.shape[2]
        if self.keys is None or prev + new > self.keys.shape[2]:
            B, heads, _, dim = keys.shape
            grow = ((new + self.step - 1) // self.step) * self.step
            k_more = mx.zeros((B, heads, grow, dim), keys.dtype)
            v_more = mx.zeros((B, heads, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = k_more, v_more
            else:
                self.keys = mx.concatenate([self.keys[:, :, :prev], k_more], axis=2)
                self.values = mx.concatenate([self.values[:, :, :prev], v_more], axis=2)
        self.offset += new
        self.keys[:, :, prev : prev + new] = keys
        self.values[:, :, prev : prev + new] = values
        k, v = self.keys[:, :, : prev + new], self.values[:, :, : prev + new]
        if self.window is not None and self.stored > self.window + self.step:
            drop = self.stored - self.window
            self.keys, self.values = k[:, :, drop:], v[:, :, drop:]
            self.first += drop
        return k, v

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return 2 * self.keys.shape[0] * self.keys.shape[1] * self.stored * self.keys.shape[3] * self.keys.itemsize


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
        self.attention_mask: Optional[mx.array] = None  # (B, positions so far)
        self.padded = True  # whether any row has padding (known after the prefill)
        # The prefill's padding mask, when known before the prefill (the generation loop's case).
        self.prefill_mask = attention_mask  # converted by the model like any input

    @property
    def offset(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def masks(self, attention_mask: mx.array, token_type_ids: Optional[mx.array]) -> dict[str, Optional[mx.array]]:
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
        self.attention_mask = (
            attention_mask if start == 0 else mx.concatenate([self.attention_mask, attention_mask], axis=1)
        )
        if start == 0:  # read once, at the prefill: an input the caller gave, not a computed result
            self.padded = not bool(mx.all(attention_mask).item())
        query = mx.arange(start, start + new)
        kept = self._sliding_slots()  # positions the sliding layers still hold from earlier calls
        # Decode hot path: one suffix query and no padding, so every held key is visible to it in full
        # layers, and in sliding ones while they hold fewer positions than the window. The all-True
        # mask is the same as none; skip building it every step.
        unpadded_decode = start > 0 and new == 1 and not self.padded
        if unpadded_decode:
            masks = {"full": None, "sliding": None}
        else:
            types = token_type_ids if start == 0 else None
            masks = prefix_lm_masks(self.attention_mask, types, self.window, query, mx.arange(start + new))
        if self.window is not None and (kept >= self.window if unpadded_decode else kept < start):
            keys = mx.arange(start - kept, start + new)  # the positions the sliding layers hold
            masks["sliding"] = prefix_lm_masks(self.attention_mask, None, self.window, query, keys)["sliding"]
        return masks

    def _sliding_slots(self) -> int:
        return next((layer.stored for layer in self.layers if layer.window is not None), 0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
