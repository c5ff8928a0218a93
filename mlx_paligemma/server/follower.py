"""`server --shard`: rank 0 serves HTTP, the other ranks follow its engine step by step.

Under `mlx.launch -n N ... -m mlx_paligemma.server --shard` every rank holds its part of the model
(`sharding.py`) and must run the same forward passes, so the same rows must join and leave the
batch on every rank in the same step. Rank 0's engine holds a `Leader` as its `sync`: each step
first announces (`Engine._announce`) the rows submitted and cancelled since the last one, as a
`StepRecord` broadcast in bytes through `mx.distributed` (`batch_job.broadcast_bytes`: one small
`all_sum` of the length, one `all_gather` of the bytes). Every other rank runs `follow`: receive a
record, submit and cancel the same rows on its own engine, step it. Tokens agree through
`rank0_tokens`, so rows finish in the same step everywhere. Idle, rank 0's worker waits for
requests and the followers wait in the collective; on shutdown rank 0 broadcasts `stop`.

A row travels as its inputs, not its image features: the prompt's ids, the model-size pixels
(3 x 224 x 224 float32 is 0.6 MB; the features of a 224 model, 256 tokens x 2048 wide in float32,
are 2 MB, and with `--shard-vision` the vision tower must run on every rank anyway), its sampling
options, and its answer grammar as (task, labels), which a follower rebuilds with
`grammar.answer_grammar`. Other logits processors (arbitrary code) and precomputed features
cannot travel and are refused at submission. Row identities are sequence numbers given by rank 0.
"""

from __future__ import annotations

import json
import signal
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..batch_job import broadcast_bytes
from ..engine import Engine, Request, Row, SamplingOptions
from ..errors import PaliGemmaError
from ..grammar import GrammarProcessor, answer_grammar

_LENGTH = struct.Struct("<Q")


@dataclass
class RowRecord:
    """What a follower needs to submit the same row as rank 0."""

    seq: int
    input_ids: list[int]
    pixel_values: np.ndarray  # (3, H, W) float32
    options: dict  # SamplingOptions' fields, logits processors aside
    grammar: Optional[tuple[str, list[str]]] = None  # (task, labels) of the row's answer grammar


@dataclass
class StepRecord:
    """What happens before a step: rows submitted, rows cancelled (by sequence number), a reset, or stop."""

    rows: list[RowRecord] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)
    reset: bool = False
    stop: bool = False

    def encode(self) -> bytes:
        """A JSON header (8-byte length first), then each row's pixels as raw float32 bytes."""
        pixels = [np.ascontiguousarray(r.pixel_values, np.float32) for r in self.rows]
        head = {
            "cancel": self.cancel,
            "reset": self.reset,
            "stop": self.stop,
            "rows": [
                {"seq": r.seq, "input_ids": r.input_ids, "options": r.options, "grammar": r.grammar, "shape": p.shape}
                for r, p in zip(self.rows, pixels)
            ],
        }
        header = json.dumps(head).encode()
        return _LENGTH.pack(len(header)) + header + b"".join(p.tobytes() for p in pixels)

    @classmethod
    def decode(cls, data: bytes) -> StepRecord:
        (size,) = _LENGTH.unpack_from(data)
        head = json.loads(data[_LENGTH.size : _LENGTH.size + size])
        offset = _LENGTH.size + size
        rows = []
        for r in head["rows"]:
            count = int(np.prod(r["shape"]))
            pixels = np.frombuffer(data, np.float32, count, offset).reshape(r["shape"])
            offset += 4 * count
            grammar = (r["grammar"][0], r["grammar"][1]) if r["grammar"] else None
            rows.append(RowRecord(r["seq"], r["input_ids"], pixels, r["options"], grammar))
        return cls(rows, head["cancel"], head["reset"], head["stop"])


_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")


def _grammar_of(request: Request) -> Optional[tuple[str, list[str]]]:
    """The row's answer grammar as (task, labels); refuses logits processors that cannot be rebuilt elsewhere."""
    found = None
    for proc in request.options.logits_processors:
        if not isinstance(proc, GrammarProcessor) or found is not None:
            raise PaliGemmaError(
                "a sharded server takes no logits processors besides one answer grammar (the other ranks rebuild it)"
            )
        found = (proc.grammar.task, list(proc.grammar.labels))
    return found


class Leader:
    """Rank 0's side: announces each step's submissions and cancellations to the other ranks."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.next_seq = 0
        self.seqs: weakref.WeakKeyDictionary[Row, int] = weakref.WeakKeyDictionary()

    def check(self, request: Request) -> None:
        """Called at submission: only rows whose inputs can travel."""
        if request.pixel_values is None:
            raise PaliGemmaError("a sharded server takes images as pixels, not precomputed features")
        _grammar_of(request)

    def announce(self, new: Sequence[Row], cancelled: Sequence[Row], reset: bool) -> None:
        """Broadcast one step's record (every step, an empty one too: the followers step when rank 0 does)."""
        record = StepRecord(reset=reset)
        for row in new:
            self.seqs[row] = seq = self.next_seq
            self.next_seq += 1
            request = row.request
            options = {name: getattr(request.options, name) for name in _OPTIONS}
            options["stop"] = list(options["stop"])
            record.rows.append(
                RowRecord(seq, [int(i) for i in request.input_ids], request.pixel_values, options, _grammar_of(request))
            )
        record.cancel = [self.seqs[row] for row in cancelled if row in self.seqs]
        self.send(record)

    def stop(self) -> None:
        self.send(StepRecord(stop=True))

    def send(self, record: StepRecord) -> None:
        broadcast_bytes(record.encode(), self.group)


def _ignore(token: Any) -> None:
    """A follower's rows tell nobody: rank 0 answers the clients."""


class Follower:
    """Another rank's engine, driven by rank 0's records."""

    def __init__(self, engine: Engine, processor: Any):
        self.engine, self.processor = engine, processor
        self.rows: dict[int, Row] = {}  # by rank 0's sequence number, while waiting or running

    def apply(self, record: StepRecord) -> bool:
        """The record's changes, then the step rank 0 takes; False when rank 0 says stop."""
        if record.stop:
            return False
        if record.reset:
            self.engine.reset()
        for r in record.rows:
            processors = []
            if r.grammar is not None:
                task, labels = r.grammar
                processors.append(answer_grammar(self.processor, f"{task} {' ; '.join(labels)}"))
            options = SamplingOptions(**r.options, logits_processors=processors)
            request = Request(r.input_ids, self.processor, r.pixel_values, options=options)
            self.rows[r.seq] = self.engine.submit(request, emit=_ignore)
        for seq in record.cancel:
            if seq in self.rows:
                self.engine.cancel(self.rows[seq])
        self.engine.step()
        self.rows = {seq: row for seq, row in self.rows.items() if not row.done}
        return True


def follow(engine: Engine, processor: Any, group: mx.distributed.Group) -> None:
    """A follower rank's loop: receive rank 0's record, apply it and step, until rank 0 says stop.

    Ctrl-C in the terminal reaches every rank: a follower ignores it and stops when rank 0 (which shuts
    down cleanly on it) says so."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    follower = Follower(engine, processor)
    while follower.apply(StepRecord.decode(broadcast_bytes(b"", group))):
        pass
