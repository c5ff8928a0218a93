"""Grammar-constrained decoding of `detect` and `segment` answers.

A model that has not learnt PaliGemma's answer format (a random one, a demo trained for an hour, a
fine-tune gone astray) writes text that `parse_detections` cannot read. Asked `detect a ; b`, the
answer's grammar is known exactly, so decoding can be restricted to it:

    answer  := "" | object (" ; " object)*
    object  := <loc>{4} label                  (detect)
             | <loc>{4} <seg>{16} label         (segment)
    label   := one of the labels of the prompt

with the loc values of a box in order (y0 <= y1, x0 <= x1: PaliGemma writes y0 x0 y1 x1).
Labels and the separator are text, so their tokens are read off the tokenizer itself: a whole
answer `<loc0000>... cat ; <loc0000>... cat` is encoded as fine-tuning encodes a suffix
(`Processor.prompt_ids`), and the ids between the loc/seg tokens are the allowed continuations,
kept as a token trie. A model's own answer, tokenised as it was trained, is therefore always
allowed, and a model that has learnt the format gives the same answer with the grammar on.

The state machine runs on the device: a token's class (eos, loc, seg, one class per trie token,
or forbidden) is a table over the vocabulary, and a state's allowed classes and successors are
small (states x classes) tables. One step reads the generated token's class, then masks the
~1200 ids that can ever be allowed and fills the rest with -inf; all lazy, so the decode loop
never waits on the host for it (mlx-lm's processors read `tokens[-1].item()`, a sync per step).
The processor is mlx-lm's shape, `proc(tokens, logits)`; each row needs its own instance
(`answer_grammar` makes one: ~5 ms with a 257k vocabulary, mostly looking up the loc/seg ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .errors import PaliGemmaError
from .tasks import LOC_BINS, SEG_CODES

SEG_VALUES = 128  # <seg000> .. <seg127>

# Token classes: column indices of the state tables. Every class from TRIE on is one token of a label path.
FORBIDDEN, EOS, LOC, SEG, TRIE = 0, 1, 2, 3, 4

# States 0..4 count the loc tokens read of the current object (0: an object may start, or the answer end);
# a segment answer's seg codes come next (states 4..4 + SEG_CODES), then the label trie's root.
START = 0
Y1_STATE, X1_STATE = 2, 3  # reading y1 (>= y0) and x1 (>= x0)


@dataclass(frozen=True, eq=False)
class AnswerGrammar:
    """The tables of one task and label set; immutable, so rows asking the same prompt may share them.

    Only `candidates` (eos, the loc and seg tokens, the labels' tokens: ~1200 ids) can ever be
    allowed, so a step works on those and leaves every other id at -inf without reading it: no
    gather or compare over the whole vocabulary (257k ids), only one fill.
    """

    task: str
    labels: tuple[str, ...]
    allowed: mx.array  # (states, classes) bool
    next_state: mx.array  # (states, classes) int32
    candidates: mx.array  # (U,) int32: the ids any state may allow
    candidate_class: mx.array  # (U,) int32
    candidate_loc: mx.array  # (U,) int32: a loc token's bin, LOC_BINS for every other candidate


class GrammarProcessor:
    """One row's state in an `AnswerGrammar`: a logits processor `proc(tokens, logits) -> logits`.

    `tokens` are the row's generated ids so far (the first call sees none); each call advances the
    state over the ids it has not seen, lazily, and masks every token the grammar forbids next.
    """

    def __init__(self, grammar: AnswerGrammar):
        self.grammar = grammar
        self.state = mx.array(START, mx.int32)
        self.y0 = mx.array(0, mx.int32)
        self.x0 = mx.array(0, mx.int32)
        self.seen = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        g = self.grammar
        for i in range(self.seen, tokens.shape[0]):  # one token per decode step
            match = g.candidates == tokens[i]  # none for a token outside the grammar: class FORBIDDEN
            self.state = g.next_state[self.state, (match * g.candidate_class).sum()]
            value = (match * g.candidate_loc).sum()
            self.y0 = mx.where(self.state == 1, value, self.y0)
            self.x0 = mx.where(self.state == 2, value, self.x0)
        self.seen = tokens.shape[0]
        bound = mx.where(self.state == Y1_STATE, self.y0, mx.where(self.state == X1_STATE, self.x0, 0))
        ok = g.allowed[self.state][g.candidate_class] & (g.candidate_loc >= bound)
        neg_inf = mx.array(-mx.inf, logits.dtype)
        kept = mx.where(ok, logits[:, g.candidates], neg_inf)
        return mx.put_along_axis(mx.full(logits.shape, neg_inf), g.candidates[None], kept, axis=-1)


def prompt_labels(prompt: str) -> Optional[tuple[str, tuple[str, ...]]]:
    """(task, labels) of a `detect a ; b` or `segment a ; b` prompt, None for any other prompt."""
    task, _, rest = prompt.strip().partition(" ")
    if task not in ("detect", "segment"):
        return None
    labels = [label.strip() for label in rest.split(";")]
    if not labels or any(not label for label in labels):
        return None
    return task, tuple(dict.fromkeys(labels))


def _structure_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids of `<loc0000>`..`<loc1023>` and `<seg000>`..`<seg127>`."""
    locs = [tokenizer.piece_to_id(f"<loc{i:04d}>") for i in range(LOC_BINS)]
    segs = [tokenizer.piece_to_id(f"<seg{i:03d}>") for i in range(SEG_VALUES)]
    if len(set(locs)) != LOC_BINS or len(set(segs)) != SEG_VALUES:  # unknown pieces all map to the unk id
        raise PaliGemmaError(
            "this tokenizer has no <locNNNN>/<segNNN> tokens, so answers cannot be constrained to the "
            "detection format: pass constrain=False (--no-constrain)"
        )
    return locs, segs


def _label_paths(tokenizer: Any, task: str, label: str, structure: set[int]) -> tuple[list[int], list[int]]:
    """The token ids of `label` followed by ` ; ` (another object follows) and of `label` at the end.

    Read off the tokenisation of a two-object answer, as fine-tuning tokenises a suffix: loc and seg
    tokens are pieces of their own, so the text between them is tokenised alone, whatever surrounds it.
    """
    obj = "<loc0000>" * 4 + ("<seg000>" * SEG_CODES if task == "segment" else "")
    ids = tokenizer.encode(f"{obj} {label} ; {obj} {label}")
    runs: list[list[int]] = []
    for i, token in enumerate(ids):
        if token in structure:
            continue
        if i == 0 or ids[i - 1] in structure:
            runs.append([])
        runs[-1].append(token)
    if len(runs) != 2 or any(t == tokenizer.eos_id for run in runs for t in run):
        raise PaliGemmaError(f"label {label!r}: its answer does not tokenise as <loc>... label ; <loc>... label")
    return runs[0], runs[1]


def _build(tokenizer: Any, task: str, labels: tuple[str, ...]) -> AnswerGrammar:
    locs, segs = _structure_ids(tokenizer)
    structure = set(locs) | set(segs)
    root = 4 + (SEG_CODES if task == "segment" else 0)

    # The label trie: node -> {token: child}; node flags: a separator ends here (an object follows),
    # a final label ends here (eos may follow).
    children: list[dict[int, int]] = [{}]
    object_follows, may_end = [False], [False]
    for label in labels:
        for path, ends in zip(_label_paths(tokenizer, task, label, structure), (object_follows, may_end)):
            node = 0
            for token in path:
                if token not in children[node]:
                    children[node][token] = len(children)
                    children.append({})
                    object_follows.append(False)
                    may_end.append(False)
                node = children[node][token]
            ends[node] = True

    trie_tokens = sorted({t for node in children for t in node})
    token_class = {tokenizer.eos_id: EOS}
    token_class.update({t: LOC for t in locs})
    token_class.update({t: SEG for t in segs})
    token_class.update({t: TRIE + i for i, t in enumerate(trie_tokens)})
    candidates = sorted(token_class)
    loc_bin = {t: v for v, t in enumerate(locs)}

    done = root + len(children)
    states, classes = done + 1, TRIE + len(trie_tokens)
    allowed = np.zeros((states, classes), bool)
    next_state = np.full((states, classes), done, np.int32)

    def allow(state: int, cls: int, to: int) -> None:
        allowed[state, cls], next_state[state, cls] = True, to

    allow(START, EOS, done)  # the empty answer: no object of these kinds
    for k in range(4):
        allow(k, LOC, k + 1)
    for k in range(4, root):
        allow(k, SEG, k + 1)
    for node, kids in enumerate(children):
        for token, child in kids.items():
            allow(root + node, token_class[token], root + child)
        if object_follows[node]:
            allow(root + node, LOC, 1)
        if may_end[node]:
            allow(root + node, EOS, done)
    allow(done, EOS, done)  # a finished row may be stepped again; it stays finished
    return AnswerGrammar(
        task,
        labels,
        allowed=mx.array(allowed),
        next_state=mx.array(next_state),
        candidates=mx.array(candidates, mx.int32),
        candidate_class=mx.array([token_class[t] for t in candidates], mx.int32),
        candidate_loc=mx.array([loc_bin.get(t, LOC_BINS) for t in candidates], mx.int32),
    )


def answer_grammar(processor: Any, prompt: str) -> Optional[GrammarProcessor]:
    """A fresh logits processor restricting a row's answer to `prompt`'s grammar, or None when the
    prompt is not `detect ...` / `segment ...` (other tasks are free text).

    Give each row its own: the processor holds the row's state. Raises `PaliGemmaError` when the
    tokenizer has no loc/seg tokens or a label cannot be told apart in the tokenised answer.
    """
    found = prompt_labels(prompt)
    if found is None:
        return None
    return GrammarProcessor(_build(processor.tokenizer, *found))


def grammar_processors(processor: Any, prompts: Sequence[str]) -> list[list[GrammarProcessor]]:
    """Per row, the grammar's processor in a list (empty for prompts other than detect/segment):
    the `logits_processors` of a batch."""
    rows = []
    for prompt in prompts:
        grammar = answer_grammar(processor, prompt)
        rows.append([grammar] if grammar is not None else [])
    return rows


def with_answer_grammar(processor: Any, prompt: str, options: dict[str, Any]) -> dict[str, Any]:
    """`generate`'s keyword arguments for one prompt with its grammar added to `logits_processors`
    (unchanged for prompts other than detect/segment)."""
    grammar = answer_grammar(processor, prompt)
    if grammar is None:
        return options
    return {**options, "logits_processors": [*(options.get("logits_processors") or []), grammar]}


def requested_only(objects: Sequence[Any], prompt: str) -> list[Any]:
    """The parsed objects (detections, segmentations) whose label the prompt asked for: a constrained
    answer cut by `max_tokens` may end in part of a label (`red` of `red car`)."""
    found = prompt_labels(prompt)
    labels = set(found[1]) if found else set()
    return [obj for obj in objects if obj.label in labels]
