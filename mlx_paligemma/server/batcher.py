"""The server's side of the engine: one worker thread steps the model's decode loop.

A request is admitted in the HTTP layer's threads (`admission.admit`: image decoded, checked,
resized to the model's input size, prompt tokenised and its length checked), so what queues
here is a `Job` holding model-size inputs only, and a bad request fails alone, with its 4xx,
before it meets any other. `submit` hands the job's row to the engine (`engine.py`); the worker
steps the engine whenever it has rows: each step decodes one token for every running row and
admits waiting rows up to `max_batch` (continuous batching: a request joins the running batch
at the next step instead of waiting for the batch to end). A row that finishes, or whose client
disconnects (`Job.cancel`), leaves the batch at once and its cache rows are dropped.

Sampling is per row, seeds included (a seeded row draws from its own random key), so any mix of
requests shares a batch and a seeded answer does not depend on what else is running.

A model split over the ranks of `mx.distributed` (`server --shard`): this is rank 0, and its engine
announces every step to the other ranks, which follow it (`follower.py`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from ..engine import Engine, Request, Row, Token, engine_for
from ..errors import PaliGemmaError
from ..sharding import shard_group

log = logging.getLogger("mlx_paligemma.server")

ARRIVAL_WAIT = 0.1  # seconds an idle worker may wait for requests the HTTP layer is still reading

# Events a job receives, in order: ("delta", text)*, then ("done", JobResult) or ("error", message, status).
Event = tuple


@dataclass
class JobResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos) or "length"
    prompt_tokens: int
    batch_size: int  # rows decoding when this one finished
    prefill_time: float  # seconds for the row's vision + prefill (its admission group's)
    generation_time: float  # seconds from the row's first to its last token
    image_size: tuple[int, int]
    time_to_first_token: float = 0.0  # seconds from submission to the first token

    @property
    def timings(self) -> dict:
        """Speed as the page shows it (the names of llama.cpp's server, which apps already read)."""
        decoded = max(len(self.token_ids), 1) - 1  # the first token comes out of the prefill
        return {
            "batch_size": self.batch_size,
            "prompt_n": self.prompt_tokens,
            "prompt_ms": round(self.prefill_time * 1000, 2),
            "prompt_per_second": round(self.prompt_tokens / max(self.prefill_time, 1e-9), 1),
            "predicted_n": len(self.token_ids),
            "predicted_ms": round(self.generation_time * 1000, 2),
            "predicted_per_second": round(decoded / self.generation_time, 1) if self.generation_time > 0 else 0.0,
            "ttft_ms": round(self.time_to_first_token * 1000, 2),
        }


@dataclass(eq=False)
class Job:
    request: Request  # model-size inputs (see `admission.admit`)
    image_size: tuple[int, int]  # the original image's, for mapping boxes back
    # Called from the worker thread with each event; must not block (e.g. loop.call_soon_threadsafe).
    emit: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    row: Optional[Row] = None
    engine: Optional[Engine] = None

    @property
    def max_tokens(self) -> int:
        return self.request.options.max_tokens

    def cancel(self) -> None:
        self.cancelled.set()
        if self.engine is not None and self.row is not None:
            self.engine.cancel(self.row)


class Stats:
    """Counters for `GET /v1/stats`; updated by the worker, read by request handlers (under a lock)."""

    def __init__(self, recent: int = 100):
        self.lock = threading.Lock()
        self.requests = 0
        self.batches = 0  # admission groups: rows prefilled together
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=recent)
        self.cancelled_rows = 0
        self.dropped_waiting = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.busy_time = 0.0
        self.ttft: collections.deque[float] = collections.deque(maxlen=recent)

    def snapshot(self, queued: int, max_batch: int, engine: dict) -> dict:
        with self.lock:
            ttft = sorted(self.ttft)
            return {
                "requests_completed": self.requests,
                "batches": self.batches,
                "max_batch": max_batch,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "recent_batch_sizes": list(self.recent_batch_sizes),
                "largest_batch": engine["largest_batch"],
                "running": engine["running"],
                "rows_joined_while_running": engine["rows_joined_while_running"],
                "queued": queued,
                "cancelled_rows": self.cancelled_rows,
                "dropped_before_running": self.dropped_waiting,
                "failed_batches": self.errors,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "busy_seconds": round(self.busy_time, 3),
                "time_to_first_token_ms": {
                    "recent": [round(t * 1000, 2) for t in self.ttft],
                    "p50": round(ttft[len(ttft) // 2] * 1000, 2) if ttft else None,
                    "p95": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] * 1000, 2) if ttft else None,
                },
                "vision_cache": engine["vision_cache"],
            }


class Batcher:
    """Owns the model's engine: `submit` jobs from any thread; one worker thread steps the engine."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        max_batch: int = 8,
        batch_window: float = 0.01,
        max_queued: int = 256,
        vision_cache_bytes: Optional[int] = None,
    ):
        """`batch_window` (seconds): how long an idle worker waits, once a request came, for more to
        prefill with it (clients that send their next request as soon as an answer comes back need a
        few milliseconds to do so). While rows decode, new requests join at the next step anyway."""
        if max_batch < 1:
            raise PaliGemmaError(f"max_batch: must be at least 1, got {max_batch}")
        if batch_window < 0:
            raise PaliGemmaError(f"batch_window: must be >= 0, got {batch_window}")
        self.model, self.processor, self.max_batch = model, processor, max_batch
        self.batch_window, self.max_queued = batch_window, max_queued
        # The model's engine from now on: library calls in this process (`mp.generate`) join its batch.
        self.engine = engine_for(model, Engine(model, max_batch=max_batch, vision_cache_bytes=vision_cache_bytes))
        group = shard_group(model)
        if group is not None and group.size() > 1:
            from .follower import Leader

            self.engine.sync = Leader(group)
        self._arriving = 0  # requests being read and admitted by the HTTP layer, about to be submitted
        self.stats = Stats()
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for rows waiting or running
        self._calls: collections.deque[tuple[concurrent.futures.Future, Callable, tuple]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="paligemma-engine", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise PaliGemmaError("the server is shutting down")
            if self.engine.waiting() >= self.max_queued:
                raise PaliGemmaError(f"the server is busy ({self.engine.waiting()} requests waiting): try again later")
            job.engine = self.engine
            job.row = self.engine.submit(job.request, emit=lambda token: self._on_token(job, token))
            self._jobs[id(job.row)] = job
            self._cond.notify_all()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap the reading of a request that will be submitted: an idle worker waits for it (briefly)."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run `fn(*args)` on the worker thread between steps (e.g. the mask decoder, another model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise PaliGemmaError("the server is shutting down")
            self._calls.append((future, fn, args))
            self._cond.notify_all()
        return future

    def warm_up(self) -> None:
        """One token of a blank image, so the first user's request does not pay for first-call setup."""
        import numpy as np

        size = self.processor.image_size
        request = Request(
            self.processor.prompt_ids("caption en")[0], self.processor, np.zeros((3, size, size), np.float32)
        )
        request.options.max_tokens = 1
        self.call(lambda: list(self.engine.run([request]))).result()

    def queued(self) -> int:
        return self.engine.waiting()

    def snapshot(self) -> dict:
        return self.stats.snapshot(self.queued(), self.max_batch, self.engine.snapshot())

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; fail the waiting and running ones (the worker stops before its next step)."""
        with self._cond:
            self._stopping = True
            jobs, self._jobs = list(self._jobs.values()), {}
            calls, self._calls = list(self._calls), collections.deque()
            self._cond.notify_all()
        for job in jobs:
            job.emit(("error", "the server is shutting down", 503))
            job.cancel()
        for future, _, _ in calls:
            future.cancel()
        self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._calls and not self.engine.has_work() and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                calls, self._calls = list(self._calls), collections.deque()
                self._wait_for_arrivals()
            for call in calls:
                self._run_call(*call)
            if not self.engine.has_work():
                continue
            tic = time.perf_counter()
            admitted_before = self.engine.stats.rows_admitted
            try:
                self.engine.step()
            except Exception:  # noqa: BLE001 -- the worker must outlive any request
                log.exception("a decode step failed")
                self._fail_running()
            admitted = self.engine.stats.rows_admitted - admitted_before
            with self.stats.lock:
                self.stats.busy_time += time.perf_counter() - tic
                if admitted:
                    self.stats.batches += 1
                    self.stats.batch_sizes[admitted] += 1
                    self.stats.recent_batch_sizes.append(admitted)
        self.engine.close()  # a sharded model's other ranks stop following

    def _wait_for_arrivals(self) -> None:
        """Idle, with requests waiting: let the ones still arriving come, so they are prefilled together
        (a quiet `batch_window` ends the wait, ARRIVAL_WAIT at most). Called holding the condition."""
        if self.engine.running() or self.batch_window <= 0:
            return
        start = last = time.monotonic()
        seen = self.engine.waiting()
        while 0 < self.engine.waiting() < self.max_batch and not self._calls and not self._stopping:
            now = time.monotonic()
            if self.engine.waiting() > seen:
                seen, last = self.engine.waiting(), now
            hard = start + max(self.batch_window, ARRIVAL_WAIT)
            limit = hard if self._arriving else min(hard, last + self.batch_window)
            if now >= limit:
                break
            self._cond.wait(limit - now)

    def _run_call(self, future: concurrent.futures.Future, fn: Callable, args: tuple) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 -- handed to the caller
            future.set_exception(e)

    def _fail_running(self) -> None:
        """A step failed: its rows cannot go on (their shared cache is suspect); fail them, keep the waiting."""
        with self.stats.lock:
            self.stats.errors += 1
        self.engine.reset()  # each running row gets an "error" event (see `_on_token`)

    def _on_token(self, job: Job, token: Token) -> None:
        """The engine's event for a job's row (on the worker thread) -> the job's events."""
        row = token.row
        if token.finish_reason == "cancelled":
            self._jobs.pop(id(row), None)
            with self.stats.lock:
                if row.admitted is None:
                    self.stats.dropped_waiting += 1
                else:
                    self.stats.cancelled_rows += 1
            return
        if token.finish_reason == "error":
            self._jobs.pop(id(row), None)
            job.emit(("error", "internal error while generating", 500))
            return
        if job.cancelled.is_set():
            return
        if token.text:
            job.emit(("delta", token.text))
        if token.finish_reason is None:
            return
        self._jobs.pop(id(row), None)
        result = JobResult(
            text=row.text,
            token_ids=list(row.token_ids),
            finish_reason=token.finish_reason,
            prompt_tokens=row.prompt_tokens,
            batch_size=self.engine.running(),
            prefill_time=row.first_token - row.admitted,
            generation_time=row.finished - row.first_token,
            image_size=job.image_size,
            time_to_first_token=row.first_token - job.enqueued,
        )
        with self.stats.lock:
            self.stats.requests += 1
            self.stats.prompt_tokens += row.prompt_tokens
            self.stats.generated_tokens += len(row.token_ids)
            self.stats.ttft.append(result.time_to_first_token)
        job.emit(("done", result))
