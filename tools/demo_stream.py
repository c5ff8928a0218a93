"""Fresh shapes scenes for every training step, reproducible from a seed: the demo trainer's data.

Each step's batch is built from (seed, step) alone, so a resumed run sees exactly the batches it
would have seen without the interruption, and two runs with one seed see the same data. Batches are
cut from a pool of `pool` batches sorted by length (similar lengths share a batch: less padding, fewer
shapes for `mx.compile`), then put in a random order.

The question mix is a weight per task of `tools.shapes.TASKS` (caption, count, colour, detect, multi,
absent). Absent-shape questions (answer: empty) join the mix only after `absent_from` of the schedule:
early on, when the model cannot place a box yet, ending the answer at once is its cheapest guess, and
the first training run measured every detection answer empty at 10-20 minutes with them in the mix.

Only numpy, PIL and the tokenizer run here (no MLX), so a background thread can prepare the next
batches while MLX computes (`Prefetcher`).
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from tools import shapes

DEFAULT_MIX = {"caption": 3.0, "count": 1.0, "colour": 2.0, "detect": 3.0, "multi": 2.0, "absent": 1.0}


def parse_mix(text: str) -> dict[str, float]:
    """`caption=3,count=1,...` -> weights; tasks not named get weight 0."""
    mix = dict.fromkeys(shapes.TASKS, 0.0)
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in mix:
            raise ValueError(f"{item!r}: expected TASK=WEIGHT with TASK one of {', '.join(shapes.TASKS)}")
        mix[name] = float(value)
        if mix[name] < 0:
            raise ValueError(f"{item!r}: weights must be >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError("every weight is 0")
    return mix


@dataclass
class SceneStream:
    """Batches of (scene, question) examples for step s, as numpy arrays for `finetune.forward`."""

    processor: Any  # mlx_paligemma.processor.Processor (numpy side only)
    batch_size: int
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    absent_from: float = 0.3
    vocab: shapes.Vocabulary = shapes.DEFAULT
    pool: int = 8
    pad_multiple: int = 8

    def weights(self, progress: float) -> dict[str, float]:
        """The mix at `progress` (0..1 of the schedule): absent questions only from `absent_from` on."""
        w = dict(self.mix)
        if progress < self.absent_from:
            w["absent"] = 0.0
        return w

    def example(self, rng: random.Random, progress: float) -> tuple[shapes.Scene, str, str]:
        weights = self.weights(progress)
        scene = shapes.make_scene(rng, vocab=self.vocab)
        tasks = [t for t in shapes.TASKS if weights[t] > 0]
        while tasks:
            task = rng.choices(tasks, [weights[t] for t in tasks])[0]
            qa = shapes.ask(scene, task, rng, self.vocab)
            if qa is not None:
                return scene, qa[0], qa[1]
            tasks.remove(task)  # not askable of this scene (no unique kind, no absent kind)
        return scene, shapes.CAPTION_PROMPT, shapes.caption(scene)

    def chunk(self, index: int, progress: float) -> list[dict[str, np.ndarray]]:
        """The `pool` batches of chunk `index` (steps index*pool ... index*pool + pool - 1)."""
        rng = random.Random(self.seed * 1_000_003 + index)
        examples = [self.example(rng, progress) for _ in range(self.pool * self.batch_size)]
        rows = [self.processor.prompt_ids(prefix, suffix) for _, prefix, suffix in examples]
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]), i))
        batches = [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.pool)]
        rng.shuffle(batches)
        return [self._arrays([examples[i] for i in b]) for b in batches]

    def _arrays(self, examples: list[tuple[shapes.Scene, str, str]]) -> dict[str, np.ndarray]:
        """The processor's left-padded arrays (as for inference), padded further on the left to a multiple
        of `pad_multiple` (fewer compiled shapes); `last`: how many final positions hold the suffix and
        the position before it (logits are computed there only)."""
        p = self.processor
        arrays = p.encode_prompts([e[1] for e in examples], [e[2] for e in examples])
        extra = -arrays["input_ids"].shape[1] % self.pad_multiple
        fill = {"input_ids": p.tokenizer.pad_id, "attention_mask": 0, "token_type_ids": 0}
        arrays = {k: np.pad(v, ((0, 0), (extra, 0)), constant_values=fill[k]) for k, v in arrays.items()}
        arrays["pixel_values"] = np.stack([p.preprocess_image(e[0].render()) for e in examples]).astype(np.float32)
        suffix = int(arrays["token_type_ids"].sum(axis=1).max()) + 1
        arrays["last"] = np.int32(
            min(-(-suffix // self.pad_multiple) * self.pad_multiple, arrays["input_ids"].shape[1])
        )
        return arrays

    def batches(self, start: int, progress_of: Any) -> Iterator[dict[str, np.ndarray]]:
        """Step `start`, `start + 1`, ... forever; `progress_of(step)` is the schedule's progress then."""
        step = start
        while True:
            index, offset = divmod(step, self.pool)
            # the progress at the chunk's first step: a resumed run rebuilds the same chunk
            for batch in self.chunk(index, progress_of(index * self.pool))[offset:]:
                yield batch
                step += 1


class Prefetcher:
    """Runs an iterator of numpy batches in a daemon thread, `depth` batches ahead (numpy and PIL
    release the GIL for most of their work, so this overlaps with MLX's compute)."""

    def __init__(self, source: Iterator, depth: int = 16):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


def describe_mix(mix: dict[str, float], absent_from: float, vocab: Optional[shapes.Vocabulary] = None) -> str:
    """One line for logs and notes: each task's share of the questions."""
    total = sum(mix.values())
    parts = ", ".join(f"{task} {100 * w / total:.0f}%" for task, w in mix.items() if w > 0)
    return f"{parts} (absent questions from {100 * absent_from:.0f}% of the schedule on)"
