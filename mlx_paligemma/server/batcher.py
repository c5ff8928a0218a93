"""The batching engine: one worker thread owns the model; requests queue and run in batches.

A request becomes a `Job` (an image already decoded, a prompt, sampling options). The worker
takes the oldest waiting job and every other waiting job that can share its batch, up to
`max_batch` rows, and runs them through the package's batched generation (`_stream_batch`:
one vision pass, one left-padded prefill, one decode step per token for all rows). Jobs that
arrive while a batch runs wait for the next one, so batches grow with load.

Which jobs share a batch:
- greedy jobs (temperature 0) always do: a row's greedy answer does not depend on its
  neighbours (left padding is masked), so a batched answer equals the single run;
- sampled jobs without a seed share a batch when temperature and top_p are equal;
- a sampled job with a seed runs alone, so the same seed gives the same answer whatever
  else the server is doing (the random stream of a batch is drawn for all its rows at once).
Rows may ask for different `max_tokens`: the batch runs to the largest, and a row stops being
reported when it reaches its own limit.

Cancellation (a client that disconnects): a waiting job is dropped before it runs; a running
row stops being decoded for its client at once (no more events), and when every row of the
batch is finished or cancelled the batch stops, so its slots go to the next batch. The rows
of a running batch share one cache, so a cancelled row's slot is reclaimed when its batch
ends, not in the middle of it.
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

from PIL import Image

from ..errors import PaliGemmaError
from ..generation import _stream_batch

log = logging.getLogger("mlx_paligemma.server")

ARRIVAL_WAIT = 0.1  # seconds a batch may wait for requests the HTTP layer is still reading

# Events a job receives, in order: ("delta", text)*, then ("done", JobResult) or ("error", message, status).
Event = tuple


@dataclass
class JobResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos) or "length"
    prompt_tokens: int
    batch_size: int
    prefill_time: float  # seconds for the batch's vision + prefill
    generation_time: float  # seconds from the first to the row's last token
    image_size: tuple[int, int]

    @property
    def timings(self) -> dict:
        """Speed as the page shows it (the names of llama.cpp's server, which apps already read)."""
        decoded = max(len(self.token_ids), 1) - 1  # the first token comes out of the prefill
        return {
            "batch_size": self.batch_size,
            "prompt_n": self.prompt_tokens,
            "prompt_ms": round(self.prefill_time * 1000, 2),
            "prompt_per_second": round(self.batch_size * self.prompt_tokens / max(self.prefill_time, 1e-9), 1),
            "predicted_n": len(self.token_ids),
            "predicted_ms": round(self.generation_time * 1000, 2),
            "predicted_per_second": round(decoded / self.generation_time, 1) if self.generation_time > 0 else 0.0,
        }


@dataclass(eq=False)
class Job:
    image: Image.Image
    prompt: str
    max_tokens: int = 100
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    # Called from the worker thread with each event; must not block (e.g. loop.call_soon_threadsafe).
    emit: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def batch_key(self) -> tuple:
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is None:
            return ("sample", self.temperature, self.top_p)
        return ("seeded", id(self))

    def cancel(self) -> None:
        self.cancelled.set()


class Stats:
    """Counters for `GET /v1/stats`; updated by the worker, read by request handlers (under a lock)."""

    def __init__(self, recent: int = 100):
        self.lock = threading.Lock()
        self.requests = 0
        self.batches = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=recent)
        self.cancelled_rows = 0
        self.dropped_waiting = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.busy_time = 0.0

    def snapshot(self, queued: int, max_batch: int) -> dict:
        with self.lock:
            return {
                "requests_completed": self.requests,
                "batches": self.batches,
                "max_batch": max_batch,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "recent_batch_sizes": list(self.recent_batch_sizes),
                "largest_batch": max(self.batch_sizes, default=0),
                "queued": queued,
                "cancelled_rows": self.cancelled_rows,
                "dropped_before_running": self.dropped_waiting,
                "failed_batches": self.errors,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "busy_seconds": round(self.busy_time, 3),
            }


class Batcher:
    """Owns the model: `submit` jobs from any thread; one worker thread runs them in batches."""

    def __init__(
        self, model: Any, processor: Any, max_batch: int = 8, batch_window: float = 0.01, max_queued: int = 256
    ):
        """`batch_window` (seconds): how long a batch that is not full waits for more requests. Clients
        that send their next request as soon as an answer comes back need a few milliseconds to do
        so; without the wait, the first of them would start a batch of one while the rest queue."""
        if max_batch < 1:
            raise PaliGemmaError(f"max_batch: must be at least 1, got {max_batch}")
        if batch_window < 0:
            raise PaliGemmaError(f"batch_window: must be >= 0, got {batch_window}")
        self.model, self.processor, self.max_batch = model, processor, max_batch
        self.batch_window, self.max_queued = batch_window, max_queued
        self._arriving = 0  # requests being read and decoded by the HTTP layer, about to be submitted
        self.stats = Stats()
        self._pending: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[concurrent.futures.Future, Callable, tuple]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self._work, name="paligemma-batcher", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise PaliGemmaError("the server is shutting down")
            if len(self._pending) >= self.max_queued:
                raise PaliGemmaError(f"the server is busy ({len(self._pending)} requests waiting): try again later")
            self._pending.append(job)
            self._cond.notify()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap the reading of a request that will be submitted: the next batch waits for it (briefly)."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run `fn(*args)` on the worker thread between batches (e.g. the mask decoder, another model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise PaliGemmaError("the server is shutting down")
            self._calls.append((future, fn, args))
            self._cond.notify()
        return future

    def warm_up(self) -> None:
        """One token of a blank image, so the first user's request does not pay for imports and
        first-call setup (several seconds: mlx-lm's sampler import pulls in transformers)."""
        blank = Image.new("RGB", (self.processor.image_size, self.processor.image_size))
        self.call(
            lambda: list(_stream_batch(self.model, self.processor, [blank], ["caption en"], max_tokens=1))
        ).result()

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def snapshot(self) -> dict:
        return self.stats.snapshot(self.queued(), self.max_batch)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; fail the waiting ones and the running batch's rows (it stops at its next token)."""
        with self._cond:
            self._stopping = True
            waiting, self._pending = list(self._pending), collections.deque()
            calls, self._calls = list(self._calls), collections.deque()
            self._cond.notify_all()
        for job in waiting:
            job.emit(("error", "the server is shutting down", 503))
        for job in list(self._running):  # the running batch stops at its next token
            job.emit(("error", "the server is shutting down", 503))
            job.cancel()
        for future, _, _ in calls:
            future.cancel()
        self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------------------
    def _take_work(self) -> tuple[list[tuple], list[Job]]:
        """The calls waiting, and the next batch: the oldest job and the waiting jobs that fit with it."""
        with self._cond:
            while not self._pending and not self._calls and not self._stopping:
                self._cond.wait()
            # A batch that is not full waits while requests keep coming (a quiet `batch_window` ends the
            # wait) or are still being read by the HTTP layer, never more than ARRIVAL_WAIT in all.
            start = last = time.monotonic()
            seen = len(self._pending)
            while 0 < len(self._pending) < self.max_batch and not self._calls and not self._stopping:
                now = time.monotonic()
                if len(self._pending) > seen:
                    seen, last = len(self._pending), now
                hard = start + max(self.batch_window, ARRIVAL_WAIT)
                limit = hard if self._arriving else min(hard, last + self.batch_window)
                if self.batch_window <= 0 or now >= limit:
                    break
                self._cond.wait(limit - now)
            if self._stopping:
                return [], []
            calls, self._calls = list(self._calls), collections.deque()
            batch: list[Job] = []
            keep: collections.deque[Job] = collections.deque()
            for job in self._pending:
                if job.cancelled.is_set():
                    with self.stats.lock:
                        self.stats.dropped_waiting += 1
                elif len(batch) < self.max_batch and (not batch or job.batch_key == batch[0].batch_key):
                    batch.append(job)
                else:
                    keep.append(job)
            self._pending = keep
            return calls, batch

    def _work(self) -> None:
        while True:
            calls, batch = self._take_work()
            if not calls and not batch:
                if self._stopping:
                    return
                continue
            for call in calls:
                self._run_call(*call)
            if not batch:
                continue
            tic = time.perf_counter()
            self._running = batch
            try:
                self._run(batch)
            except PaliGemmaError as e:  # e.g. an image the processor cannot take
                self._fail(batch, str(e), 400)
            except Exception as e:  # noqa: BLE001 -- the worker must outlive any request
                log.exception("batch of %d failed", len(batch))
                self._fail(batch, f"internal error while generating ({type(e).__name__})", 500)
            self._running = []
            with self.stats.lock:
                self.stats.busy_time += time.perf_counter() - tic

    def _run_call(self, future: concurrent.futures.Future, fn: Callable, args: tuple) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 -- handed to the caller
            future.set_exception(e)

    def _fail(self, batch: list[Job], message: str, status: int) -> None:
        with self.stats.lock:
            self.stats.errors += 1
        for job in batch:
            job.emit(("error", message, status))

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        B = len(batch)
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.batch_sizes[B] += 1
            self.stats.recent_batch_sizes.append(B)
        processor = self.processor
        prompt_tokens = [len(processor.prompt_ids(job.prompt)[0]) for job in batch]
        ids: list[list[int]] = [[] for _ in batch]
        emitted = [""] * B
        finished = [False] * B
        tic = time.perf_counter()
        prefill_done: Optional[float] = None

        def finish(b: int, reason: str) -> None:
            finished[b] = True
            text = processor.decode(ids[b])
            if text.startswith(emitted[b]) and len(text) > len(emitted[b]):
                batch[b].emit(("delta", text[len(emitted[b]) :]))
            now = time.perf_counter()
            result = JobResult(
                text=text,
                token_ids=list(ids[b]),
                finish_reason=reason,
                prompt_tokens=prompt_tokens[b],
                batch_size=B,
                prefill_time=(prefill_done or now) - tic,
                generation_time=now - (prefill_done or now),
                image_size=batch[b].image.size,
            )
            with self.stats.lock:
                self.stats.requests += 1
                self.stats.prompt_tokens += prompt_tokens[b]
                self.stats.generated_tokens += len(ids[b])
            batch[b].emit(("done", result))

        stream = _stream_batch(
            self.model,
            processor,
            [job.image for job in batch],
            [job.prompt for job in batch],
            max_tokens=max(job.max_tokens for job in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed,
        )
        try:
            for chunk in stream:
                if prefill_done is None:
                    prefill_done = time.perf_counter()
                for b, job in enumerate(batch):
                    if not finished[b] and job.cancelled.is_set():
                        finished[b] = True
                        with self.stats.lock:
                            self.stats.cancelled_rows += 1
                if all(finished):
                    break
                b = chunk.row
                if finished[b]:  # cancelled, or past its own max_tokens while longer rows go on
                    continue
                if chunk.finish_reason == "stop":
                    finish(b, "stop")
                else:
                    ids[b].append(chunk.token_id)
                    if chunk.text:
                        emitted[b] += chunk.text
                        batch[b].emit(("delta", chunk.text))
                    if chunk.finish_reason == "length" or len(ids[b]) >= batch[b].max_tokens:
                        finish(b, "length")
                if all(finished):
                    break
        finally:
            stream.close()  # drops the batch's cache now, not at the next garbage collection
