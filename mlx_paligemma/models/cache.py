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
        self.offset = 0  # positions seen so far on the batch's shared timeline
        self.first = 0  # the position held in slot 0 (> 0 once a sliding layer or a trim dropped slots)
        # Per-row (B,) shift from the shared timeline to each row's own positions: rows that joined a
        # running batch were left-padded onto its timeline, but keep the RoPE positions of their own
        # prefill (None: every row on the shared timeline).
        self.position_shift: Optional[mx.array] = None

    @property
    def rope_offset(self):
        """The RoPE position of this call's first token: a number, or one per row after rows joined."""
        return self.offset if self.position_shift is None else self.position_shift + self.offset

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

    def _held(self) -> tuple[mx.array, mx.array]:
        return self.keys[:, :, : self.stored], self.values[:, :, : self.stored]

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
        self.attention_mask: Optional[mx.array] = None  # (B, positions from `base` on)
        self.base = 0  # the position of attention_mask's first column (> 0 once common padding was trimmed)
        self.padded = True  # whether any row has padding (known after the prefill)
        # The prefill's padding mask, when known before the prefill (the generation loop's case).
        self.prefill_mask = attention_mask  # converted by the model like any input

    @property
    def offset(self) -> int:
        return 0 if self.attention_mask is None else self.base + self.attention_mask.shape[1]

    @property
    def batch_size(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[0]

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
        # Masks index attention_mask, so they count positions from `base` (relative distances, all the
        # rules need, are the same).
        query = mx.arange(start - self.base, start + new - self.base)
        kept = self._sliding_slots()  # positions the sliding layers still hold from earlier calls
        # Decode hot path: one suffix query and no padding, so every held key is visible to it in full
        # layers, and in sliding ones while they hold fewer positions than the window. The all-True
        # mask is the same as none; skip building it every step.
        unpadded_decode = start > 0 and new == 1 and not self.padded
        if unpadded_decode:
            masks = {"full": None, "sliding": None}
        else:
            types = token_type_ids if start == 0 else None
            masks = prefix_lm_masks(self.attention_mask, types, self.window, query, mx.arange(start + new - self.base))
        if self.window is not None and (kept >= self.window if unpadded_decode else kept < start - self.base):
            keys = mx.arange(start - kept - self.base, start + new - self.base)  # the positions the sliding layers hold
            masks["sliding"] = prefix_lm_masks(self.attention_mask, None, self.window, query, keys)["sliding"]
        return masks

    def _sliding_slots(self) -> int:
        return next((layer.stored for layer in self.layers if layer.window is not None), 0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    # -- rows joining and leaving a running batch (the engine's continuous batching) ---------------
    def extend(self, other: PrefixLMCache) -> None:
        """Append `other`'s rows (a group prefilled on its own) to this batch, in place.

        The group with fewer positions is left-padded onto the longer one's timeline: its slots
        shift right, its padding columns are masked, and its `position_shift` keeps the RoPE
        positions its keys were computed with, so a joined row decodes exactly as it would alone.
        """
        total = max(self.offset, other.offset)
        parts = [(self, total - self.offset), (other, total - other.offset)]
        base = min(c.base + d for c, d in parts)
        masks, shifts = [], []
        for c, d in parts:
            pad = c.base + d - base
            mask = c.attention_mask.astype(mx.int32)
            masks.append(mx.pad(mask, [(0, 0), (pad, 0)]) if pad else mask)
            shift = c.layers[0].position_shift
            shifts.append((mx.zeros((c.batch_size,), mx.int32) if shift is None else shift) - d)
        for i, layer in enumerate(self.layers):
            first = min(c.layers[i].first + d for c, d in parts)
            keys, values = [], []
            for c, d in parts:
                k, v = c.layers[i]._held()
                pad = c.layers[i].first + d - first
                keys.append(mx.pad(k, [(0, 0), (0, 0), (pad, 0), (0, 0)]) if pad else k)
                values.append(mx.pad(v, [(0, 0), (0, 0), (pad, 0), (0, 0)]) if pad else v)
            layer.keys, layer.values = mx.concatenate(keys, axis=0), mx.concatenate(values, axis=0)
            layer.offset, layer.first = total, first
        self.attention_mask, self.base = mx.concatenate(masks, axis=0), base
        self._set_shift(mx.concatenate(shifts))
        self.padded = True
        self._trim()

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order), in place; the left padding all of them share is dropped."""
        index = mx.array(keep, mx.int32)
        self.attention_mask = self.attention_mask[index]
        for layer in self.layers:
            k, v = layer._held()
            layer.keys, layer.values = k[index], v[index]
        shift = self.layers[0].position_shift
        self._set_shift(None if shift is None else shift[index])
        self._trim()

    def _set_shift(self, shift: Optional[mx.array]) -> None:
        if shift is not None and not bool(mx.any(shift != 0).item()):
            shift = None  # every row on the shared timeline: the plain (scalar) RoPE offset
        for layer in self.layers:
            layer.position_shift = shift

    def _trim(self) -> None:
        """Drop the leading positions that are padding in every row (a left row's prompt was longer)."""
        mask = self.attention_mask.astype(mx.bool_)
        leading = int(mx.min(mx.argmax(mask, axis=1)).item()) if mask.shape[1] else 0
        self.padded = not bool(mx.all(mask).item())
        if leading == 0:
            return
        self.base += leading
        self.attention_mask = self.attention_mask[:, leading:]
        for layer in self.layers:
            if layer.first < self.base:
                k, v = layer._held()
                drop = self.base - layer.first
                layer.keys, layer.values, layer.first = k[:, :, drop:], v[:, :, drop:], self.base
