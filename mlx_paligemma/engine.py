"""The decode loop: rows join and leave a running batch between steps (continuous batching).

Every generation runs here: `generate`, `stream_generate` and batched generation in
`generation.py`, the CLI, and the server. The shape is mlx-lm's `BatchGenerator`: `submit`
queues a row, each `step` first decodes one token for every running row, then admits waiting
rows (their own vision pass and bidirectional prefill, which cannot be chunked) and appends
their KV entries to the running batch's cache (`PrefixLMCache.extend`: the shorter side is
left-padded, and joined rows keep their own RoPE positions, so a row decodes exactly as it
would alone). A finished or cancelled row leaves at the end of the step and its cache rows are
dropped (`PrefixLMCache.filter`, which also trims the padding every remaining row shares).

Sampling is per row: temperature, top-p, top-k, repetition penalty, logits processors
(mlx-lm's `proc(tokens, logits)` shape, applied in order after the repetition penalty), stop
token ids and strings, max tokens, and a seed. A seeded row draws from its own random key,
split once per token as MLX's global generator does, so it gives the same tokens whatever else
is in the batch (and the same as `mx.random.seed(seed)` before a single run).

Threads: the engine computes on its own stream, one per thread (`mx.new_thread_local_stream`; on
the CPU the thread's default stream, see `engine_stream`); steps are serialised by a lock, and every
array the engine keeps between steps (cache, last tokens, random keys) is evaluated before the lock
is released, because an unevaluated MLX array belongs to the stream, hence the thread, that made it.
Any thread may drive the loop: a library call steps the engine until its own rows are done, and rows
of other threads decode with it.

Tensor parallelism (`server --shard`): rank 0's engine has a `sync` (`server/follower.py`). Rows
submitted and cancelled there are held until the next step, whose first act is to announce them
(`sync.announce`), so a row submitted or cancelled while a step runs cannot reach rank 0's batch
before the other ranks hear of it; the other ranks apply each announcement to their own engine
and step it, so every rank admits, decodes and drops the same rows in the same step.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import PaliGemmaError
from .processor import Processor
from .sampling import LogitsProcessor, make_repetition_penalty, make_sampler
from .sharding import rank0_tokens

# Each generation option: the rule it must satisfy and the message when it does not. The library
# reports the parameter's name (`max_tokens: ...`), the CLI the flag's (`--max-tokens: ...`).
_OPTION_RULES = {
    "max_tokens": (lambda v: v >= 1, "must be at least 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0"),
    "repetition_penalty": (lambda v: v is None or v > 0, "must be > 0"),
}


def option_errors(**options: Any) -> list[tuple[str, str]]:
    """(parameter, message) for every generation option out of range."""
    return [
        (name, f"{message}, got {options[name]}")
        for name, (ok, message) in _OPTION_RULES.items()
        if name in options and not ok(options[name])
    ]


@dataclass
class SamplingOptions:
    """How one row is decoded. `stop`: strings and/or token ids that end the row (besides eos)."""

    max_tokens: int = 100
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Sequence[Union[str, int]] = ()
    logits_processors: Sequence[LogitsProcessor] = ()

    def check(self) -> None:
        errors = option_errors(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )
        if errors:
            raise PaliGemmaError(f"{errors[0][0]}: {errors[0][1]}")
        bad = [s for s in self.stop if not (isinstance(s, int) or (isinstance(s, str) and s))]
        if bad:
            raise PaliGemmaError(f"stop: each entry must be a token id or a non-empty string, got {bad[0]!r}")


def check_prompt_length(model: Any, prompt_tokens: int) -> None:
    """Refuse a prefix the model has no positions for; the reference would run, slowly, into garbage."""
    limit = model.config.text_config.max_position_embeddings
    if prompt_tokens > limit:
        raise PaliGemmaError(
            f"the prompt is {prompt_tokens} tokens (image tokens included), more than the model's limit "
            f"of {limit} (max_position_embeddings): shorten it"
        )


class Detokenizer:
    """Incremental text of one row, as `processor.decode(all ids)` would give it.

    Each step decodes only the ids since the previous chunk's start (as vLLM does): the
    previous chunk gives the new one its context (a leading space, a byte piece it completes),
    so the cost per token stays constant instead of growing with the answer. Text that ends in
    a partial UTF-8 character, or a run of byte pieces not yet ended, is held back until complete
    (the `tokenizers` decoder turns a whole run of bytes into text at once, valid or not).
    """

    def __init__(self, processor: Processor):
        self.decode = processor.decode
        self.byte_ids = getattr(processor.tokenizer, "byte_ids", frozenset())
        self.ids: list[int] = []
        self.prefix_offset = 0  # where the decoded window starts
        self.read_offset = 0  # ids before this are emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        emitted = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        if not final and (len(text) <= len(emitted) or text.endswith("\ufffd") or self.ids[-1] in self.byte_ids):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]


class _StopStrings:
    """Holds back text that may be the start of a stop string; cuts the answer where one appears."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def feed(self, piece: str, final: bool) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string ended the row)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = (
            0
            if final
            else max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False


# -- vision-feature cache ------------------------------------------------------------------------
def image_key(pixel_values: np.ndarray) -> str:
    """Content hash of a model-size image (the same pixels give the same features)."""
    data = np.ascontiguousarray(pixel_values)
    return hashlib.blake2b(data.tobytes() + str((data.shape, data.dtype)).encode(), digest_size=16).hexdigest()


def _nbytes(features: Any) -> int:
    return int(features.nbytes) if hasattr(features, "nbytes") else features.numel() * features.element_size()


class VisionCache:
    """LRU of image features keyed by `image_key`, bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.bytes = 0

    def get(self, key: str) -> Any:
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return features

    def resize(self, max_bytes: int) -> None:
        """A new budget; 0 turns the cache off (a benchmark that times the vision tower on every run)."""
        with self._lock:
            self.max_bytes = max_bytes
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)

    def count_hit(self) -> None:
        with self._lock:
            self.hits += 1

    def put(self, key: str, features: Any) -> None:
        size = _nbytes(features)
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            self._items[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes}


# -- the backends' side: what the loop asks of a model -------------------------------------------
class WeakModel:
    """A `model` attribute held by weak reference. The model owns its engine (`engine_for` keeps it on the
    model, so its vision cache lasts between calls); were the engine and its runner to own the model too,
    `del model` would leave the weights alive until the next garbage-collection cycle."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}_ref"

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        if obj is None:
            return self
        model = obj.__dict__[self.slot]()
        if model is None:
            raise PaliGemmaError("this engine's model was deleted")
        return model

    def __set__(self, obj: Any, model: Any) -> None:
        obj.__dict__[self.slot] = weakref.ref(model)


class MLXRunner:
    """Encode, prefill and step an MLX `Model`; caches join (`extend`) and shrink (`filter`)."""

    supports_join = True
    model = WeakModel()

    def __init__(self, model: nn.Module, stream: Any):
        self.model, self.stream = model, stream

    def encode_image(self, pixel_values: np.ndarray) -> mx.array:
        with mx.stream(self.stream):
            features = self.model.encode_image(mx.array(pixel_values))
            mx.eval(features)
        return features

    def prefill(self, input_ids: np.ndarray, features: Sequence[mx.array], attention_mask: np.ndarray):
        with mx.stream(self.stream):
            cache = self.model.make_cache(attention_mask)
            return cache, self.model.prefill(input_ids, mx.concatenate(list(features), axis=0), cache)

    def step(self, cache: Any, tokens: mx.array) -> mx.array:
        with mx.stream(self.stream):
            return self.model.decode_step(tokens, cache)

    def extend(self, cache: Any, other: Any) -> None:
        with mx.stream(self.stream):
            cache.extend(other)

    def filter(self, cache: Any, keep: list[int]) -> None:
        with mx.stream(self.stream):
            cache.filter(keep)

    @staticmethod
    def arrays(cache: Any) -> list:
        """What the cache holds, to evaluate before a step ends (see the module docstring)."""
        out = [cache.attention_mask]
        for layer in cache.layers:
            out += [layer.keys, layer.values] + ([layer.position_shift] if layer.position_shift is not None else [])
        return out

    @staticmethod
    def peak_memory_gb() -> float:
        return mx.get_peak_memory() / 1e9

    def feature_bytes(self) -> int:
        cfg = self.model.config
        return cfg.num_image_tokens * cfg.text_config.hidden_size * self.model.dtype.size


def engine_stream(device: Any) -> Any:
    """What an engine computes on, valid in whichever thread uses it (MLX streams belong to a thread).

    On the GPU a stream of its own in each thread (`mx.new_thread_local_stream`), as mlx-lm generates on
    its own stream. On the CPU the device itself, i.e. the using thread's default stream: each CPU stream
    is a worker thread, and once a second thread has called MKL (Intel OpenMP), the first thread's MKL
    calls run about half as fast from then on, with a core idle. Measured: after one `generate` on a
    stream of its own, the demo trainer's steps went from 1.45 to 0.8 per second for the rest of the
    run (0.45 cores idle); with the thread's default stream they stay at 1.6.
    """
    if device.type == mx.DeviceType.cpu:
        return device
    return mx.new_thread_local_stream(device)


def runner_for(model: Any, stream: Any):
    if isinstance(model, nn.Module):
        return MLXRunner(model, stream)
    from .reference.generation import TorchRunner

    return TorchRunner(model, stream)


# -- rows ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Request:
    """One row's input, ready for the model: the prompt's ids (image tokens included, as
    `processor.prompt_ids` gives them) and a model-size image or its features."""

    input_ids: Sequence[int]
    processor: Processor
    pixel_values: Optional[np.ndarray] = None  # (3, H, W) float32, the model's input size
    features: Any = None  # or the image's features (1, N, hidden), e.g. from `encode_image`
    options: SamplingOptions = field(default_factory=SamplingOptions)


@dataclass
class Token:
    """What a step gives a row: a token and the text it completes, and why the row ended, if it did."""

    row: Row
    token_id: int
    text: str
    finish_reason: Optional[str] = None  # "stop" (eos, a stop id or string), "length", "cancelled", "error"


class Row:
    """A request's state while it waits and decodes. Events go to `emit` (called on the stepping
    thread) or, by default, to `events`, which the submitting thread drains."""

    def __init__(self, request: Request, emit: Optional[Callable[[Token], None]] = None):
        self.request, self.options = request, request.options
        self.events: collections.deque[Token] = collections.deque()
        self.emit = emit or self.events.append
        self.prompt_tokens = len(request.input_ids)
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.finish_reason: Optional[str] = None
        self.text: Optional[str] = None  # the whole answer, once finished
        self.cancelled = False
        self.joined_running = False  # admitted while other rows were decoding
        self.submitted = time.perf_counter()
        self.admitted = self.first_token = self.finished = None
        self.vision_time = 0.0
        tokenizer = request.processor.tokenizer
        opts = self.options
        self.stop_ids = {tokenizer.eos_id} | {s for s in opts.stop if isinstance(s, int)}
        self.stops = _StopStrings([s for s in opts.stop if isinstance(s, str)])
        self.detok = Detokenizer(request.processor)
        self.processors: list[LogitsProcessor] = []
        if opts.repetition_penalty:
            self.processors.append(make_repetition_penalty(opts.repetition_penalty))
        self.processors += list(opts.logits_processors)
        self.history = mx.zeros((0,), mx.int32)  # generated ids, for the logits processors
        self.sampler = make_sampler(opts.temperature, opts.top_p, opts.top_k)
        self.key = mx.random.key(opts.seed) if opts.seed is not None and opts.temperature > 0 else None
        mx.eval(self.state())  # made on the submitting thread, used on the stepping one

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain_greedy(self) -> bool:
        return self.options.temperature == 0 and not self.processors

    def sample(self, logits: mx.array) -> mx.array:
        """(1, vocab) logits -> (1,) token: processors in order, then greedy or a draw with this row's key."""
        for proc in self.processors:
            logits = proc(self.history, logits)
        if self.options.temperature == 0:
            return mx.argmax(logits, axis=-1)
        if self.key is None:
            return self.sampler(logits.astype(mx.float32))
        self.key, sub = mx.random.split(self.key)  # as MLX's global generator splits its key per draw
        return self.sampler(logits.astype(mx.float32), key=sub)

    def state(self) -> list:
        return [a for a in (self.history, self.key) if a is not None]

    def take(self, token: int, now: float) -> Token:
        """Account a sampled token; the Token to emit."""
        if self.first_token is None:
            self.first_token = now
        if token in self.stop_ids:
            text, _ = self.stops.feed(self.detok.flush(), final=True)
            return self._finish(Token(self, token, text, "stop"), now)
        self.token_ids.append(token)
        if self.processors:
            self.history = mx.concatenate([self.history, mx.array([token], mx.int32)])
        last = len(self.token_ids) >= self.options.max_tokens
        piece = self.detok.add(token) + (self.detok.flush() if last else "")
        text, stopped = self.stops.feed(piece, final=last)
        if stopped:
            return self._finish(Token(self, token, text, "stop"), now, cut=True)
        if last:
            return self._finish(Token(self, token, text, "length"), now)
        self.text_parts.append(text)
        return Token(self, token, text)

    def _finish(self, event: Token, now: float, cut: bool = False) -> Token:
        self.text_parts.append(event.text)
        self.finish_reason, self.finished = event.finish_reason, now
        # A stop string cuts the answer inside a token: the text is what was emitted.
        self.text = "".join(self.text_parts) if cut else self.request.processor.decode(self.token_ids)
        return event


@dataclass
class EngineStats:
    steps: int = 0
    rows_admitted: int = 0
    rows_joined_running: int = 0  # admitted while other rows were decoding
    rows_finished: int = 0
    rows_cancelled: int = 0
    largest_batch: int = 0
    recent_ttft: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))


class Engine:
    """One model's decode loop. `submit` from any thread; `step` (or `run`) from any thread, serialised."""

    model = WeakModel()

    def __init__(self, model: Any, max_batch: int = 32, vision_cache_bytes: Optional[int] = None):
        if max_batch < 1:
            raise PaliGemmaError(f"max_batch: must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.stream = engine_stream(mx.default_device())
        self.runner = runner_for(model, self.stream)
        if vision_cache_bytes is None:
            vision_cache_bytes = 64 * self.runner.feature_bytes()  # ~64 images of this model
        self.vision_cache = VisionCache(vision_cache_bytes)
        self.stats = EngineStats()
        self._queue_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self.work = threading.Condition(self._queue_lock)  # notified when a row is submitted
        self._waiting: collections.deque[Row] = collections.deque()
        self._rows: list[Row] = []  # the running rows, in cache order
        self._cache: Any = None
        self._tokens: Optional[mx.array] = None  # each running row's last token, fed to the next step
        # Tensor-parallel rank 0 only (see the module docstring): what the next step announces first.
        self.sync: Any = None
        self._held: collections.deque[Row] = collections.deque()  # submitted, not yet announced
        self._cancels: list[Row] = []
        self._reset_pending = False

    # -- any thread -------------------------------------------------------------------------------
    def submit(self, request: Request, emit: Optional[Callable[[Token], None]] = None) -> Row:
        request.options.check()
        if self.sync is not None:
            self.sync.check(request)
        row = Row(request, emit)
        with self.work:
            (self._waiting if self.sync is None else self._held).append(row)
            self.work.notify_all()
        return row

    def cancel(self, row: Row) -> None:
        """The row stops: a waiting row is dropped, a running one leaves the batch at the next step."""
        if self.sync is None:
            row.cancelled = True
            return
        with self._queue_lock:  # takes effect when the next step announces it
            self._cancels.append(row)

    def has_work(self) -> bool:
        with self._queue_lock:
            return bool(self._waiting or self._held or self._rows)

    def running(self) -> int:
        return len(self._rows)

    def waiting(self) -> int:
        with self._queue_lock:
            return len(self._waiting) + len(self._held)

    def encode(self, pixel_values: np.ndarray) -> tuple[Any, float]:
        """Features (1, N, hidden) of one model-size image, through the vision cache; (features, seconds)."""
        return self._encode([pixel_values])[0]

    def run(self, requests: Sequence[Request]) -> Iterator[tuple[int, Token]]:
        """Submit `requests` and step until they are done, yielding (index, token) as they come.

        Closing the iterator early cancels the rows still running (their cache rows are dropped)."""
        rows = [self.submit(r) for r in requests]
        try:
            while True:
                for i, row in enumerate(rows):
                    while row.events:
                        yield i, row.events.popleft()
                if all(row.done for row in rows):
                    return
                with self._step_lock:
                    if not any(row.events for row in rows):  # another thread may have stepped for us
                        self.step()
        finally:
            for row in rows:
                if not row.done:
                    self.cancel(row)
            with self._step_lock:
                self._drop_cancelled()

    # -- the stepping thread ------------------------------------------------------------------------
    def step(self) -> None:
        """One token for every running row, then admit waiting rows (their first token comes from their prefill)."""
        with self._step_lock:
            if self.sync is not None:
                self._announce()
            self._drop_cancelled()
            now_rows: list[Row] = []
            tokens: list[mx.array] = []
            if self._rows:
                logits = self.runner.step(self._cache, self._tokens)
                tokens.append(self._sample(self._rows, logits))
                now_rows += self._rows
            admitted = self._admit()
            if admitted:
                try:
                    cache, logits = self._prefill(admitted)
                    tokens.append(self._sample(admitted, logits))
                    if self._cache is None:
                        self._cache = cache
                    else:
                        self.runner.extend(self._cache, cache)
                except Exception:
                    for row in admitted:  # they are nowhere now: tell their owners
                        self._end(row, "error")
                    raise
                self._rows += admitted
                now_rows += admitted
            if not now_rows:
                return
            with mx.stream(self.stream):
                self._tokens = mx.concatenate(tokens) if len(tokens) > 1 else tokens[0]
                # a tensor-parallel model's ranks must agree on every token (identity otherwise)
                self._tokens = rank0_tokens(self.model, self._tokens)
            mx.eval(self._tokens, *self.runner.arrays(self._cache), *[a for r in now_rows for a in r.state()])
            self.stats.steps += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(now_rows))
            now = time.perf_counter()
            for row, token in zip(now_rows, self._tokens.tolist()):
                if row.cancelled:
                    continue
                event = row.take(token, now)
                if row.first_token == now:
                    self.stats.recent_ttft.append(now - row.submitted)
                if row.done:
                    self.stats.rows_finished += 1
                row.emit(event)
            self._drop_finished()

    def _announce(self) -> None:
        """Tensor-parallel rank 0: the rows submitted and cancelled since the last step take effect now,
        as the other ranks hear of them."""
        with self._queue_lock:
            new, self._held = list(self._held), collections.deque()
            cancels, self._cancels = self._cancels, []
            reset, self._reset_pending = self._reset_pending, False
            self._waiting.extend(new)
        for row in cancels:
            row.cancelled = True
        with mx.stream(self.stream):  # the stepping thread's stream, as the step's own collectives
            self.sync.announce(new, cancels, reset)

    def close(self) -> None:
        """Tensor-parallel rank 0: tell the other ranks to stop following (after the last step)."""
        with self._step_lock, mx.stream(self.stream):
            if self.sync is not None:
                self.sync.stop()
                self.sync = None

    def _sample(self, rows: list[Row], logits: mx.array) -> mx.array:
        with mx.stream(self.stream):
            if all(row.plain_greedy for row in rows):
                return mx.argmax(logits, axis=-1).astype(mx.int32)
            return mx.concatenate([row.sample(logits[i : i + 1]).astype(mx.int32) for i, row in enumerate(rows)])

    def _admit(self) -> list[Row]:
        if self._rows and not self.runner.supports_join:
            return []
        admitted: list[Row] = []
        with self._queue_lock:
            while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                row = self._waiting.popleft()
                if row.cancelled:
                    self._end(row, "cancelled")
                    continue
                admitted.append(row)
        now = time.perf_counter()
        for row in admitted:
            row.admitted, row.joined_running = now, bool(self._rows)
        self.stats.rows_admitted += len(admitted)
        self.stats.rows_joined_running += sum(r.joined_running for r in admitted)
        return admitted

    def _encode(self, images: list[np.ndarray]) -> list[tuple[Any, float]]:
        """Features of each model-size image: cached ones reused, the others in one vision pass."""
        keys = [image_key(p) for p in images]
        found: dict[str, Any] = {}
        for k in keys:  # an image twice in one group is encoded once: the second time is a hit
            if k in found:
                self.vision_cache.count_hit()
            else:
                found[k] = self.vision_cache.get(k)
        missing = [k for k, f in found.items() if f is None]
        seconds = 0.0
        if missing:
            tic = time.perf_counter()
            encoded = self.runner.encode_image(np.stack([images[keys.index(k)] for k in missing]))
            seconds = time.perf_counter() - tic
            for j, k in enumerate(missing):
                found[k] = encoded[j : j + 1]
                self.vision_cache.put(k, found[k])
        return [(found[k], seconds if k in missing else 0.0) for k in keys]

    def _prefill(self, rows: list[Row]):
        """The admitted rows' vision (through the cache) and their left-padded bidirectional prefill."""
        raw = [r for r in rows if r.request.features is None]
        features = {id(r): r.request.features for r in rows if r.request.features is not None}
        for row, (f, seconds) in zip(raw, self._encode([r.request.pixel_values for r in raw]) if raw else []):
            features[id(row)], row.vision_time = f, seconds
        length = max(r.prompt_tokens for r in rows)
        input_ids = np.zeros((len(rows), length), np.int32)
        attention_mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            input_ids[i, length - row.prompt_tokens :] = row.request.input_ids
            attention_mask[i, length - row.prompt_tokens :] = 1
        return self.runner.prefill(input_ids, [features[id(r)] for r in rows], attention_mask)

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.cancelled and not row.done:
                self._end(row, "cancelled")
        self._drop_finished()

    def _end(self, row: Row, reason: str) -> None:
        row.finish_reason, row.finished = reason, time.perf_counter()
        row.text = "".join(row.text_parts)
        self.stats.rows_cancelled += reason == "cancelled"
        row.emit(Token(row, -1, "", reason))

    def reset(self) -> None:
        """Drop the running batch (after a failed step: its cache is suspect); waiting rows stay."""
        with self._step_lock:
            for row in self._rows:
                if not row.done:
                    self._end(row, "error")
            self._rows, self._cache, self._tokens = [], None, None
            self._reset_pending = self.sync is not None  # the other ranks drop theirs before the next step

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._tokens = None
            return
        self.runner.filter(self._cache, keep)
        with mx.stream(self.stream):
            self._tokens = self._tokens[mx.array(keep, mx.int32)]
        mx.eval(self._tokens, *self.runner.arrays(self._cache))

    def cache_length(self) -> int:
        """Positions the running batch's cache spans (0 when idle): it shrinks when long rows leave."""
        return 0 if self._cache is None else self._cache.offset - self._cache.base

    def snapshot(self) -> dict:
        s = self.stats
        ttft = sorted(s.recent_ttft)
        return {
            "steps": s.steps,
            "rows_admitted": s.rows_admitted,
            "rows_joined_while_running": s.rows_joined_running,
            "rows_finished": s.rows_finished,
            "rows_cancelled": s.rows_cancelled,
            "running": self.running(),
            "largest_batch": s.largest_batch,
            "time_to_first_token_ms": {
                "p50": round(1000 * ttft[len(ttft) // 2], 2) if ttft else None,
                "max": round(1000 * ttft[-1], 2) if ttft else None,
                "recent": len(ttft),
            },
            "vision_cache": self.vision_cache.stats(),
        }


_ENGINES_LOCK = threading.Lock()


def engine_for(model: Any, engine: Optional[Engine] = None) -> Engine:
    """The model's own engine (made on first use, kept on the model): one loop and one lock per model.
    Given `engine` (the server's, with its batch size and cache budget), it becomes the model's."""
    with _ENGINES_LOCK:
        if engine is None:
            engine = getattr(model, "_paligemma_engine", None) or Engine(model)
        object.__setattr__(model, "_paligemma_engine", engine)
        return engine
