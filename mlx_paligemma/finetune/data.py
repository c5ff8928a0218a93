"""JSON-lines data: parsing with every bad line reported, padded batches with a bounded image cache,
the epoch's batches, and the prefetch thread that prepares them (numpy and PIL only)."""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import PaliGemmaError, ProcessorError
from ..processor import Processor, load_image, to_rgb


class DataError(PaliGemmaError):
    """One or more lines of a data file cannot be used; the message lists every one of them."""


@dataclass
class Example:
    image: Path
    prefix: str
    suffix: str
    line: int


def read_jsonl(path: str | os.PathLike, check_images: bool = True) -> list[Example]:
    """Parse a data file; every bad line (malformed JSON, missing or non-string field, unreadable
    image) is collected, and all of them are reported at once, with line numbers, in one DataError."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    examples, problems, checked = [], [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: malformed JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {n}: expected an object with image, prefix and suffix")
            continue
        missing = [k for k in ("image", "prefix", "suffix") if not isinstance(record.get(k), str)]
        if missing:
            problems.append(f"line {n}: missing or non-string field {', '.join(repr(k) for k in missing)}")
            continue
        image = (path.parent / record["image"]).expanduser()
        if check_images:
            if image not in checked:
                checked[image] = _image_problem(image)
            if checked[image]:
                problems.append(f"line {n}: {checked[image]}")
                continue
        examples.append(Example(image, record["prefix"], record["suffix"], n))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DataError(f"{path}: {len(problems)} bad line(s): " + "; ".join(shown))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _image_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return f"image {str(path)!r} not found"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"image {str(path)!r} is not a readable image ({type(e).__name__})"
    return None


class Batcher:
    """Examples -> padded numpy batches. Images are decoded and resized when first used and kept as
    uint8 in a cache of at most `image_cache` images (least recently used dropped first), so a data
    set larger than memory streams from disk while a small one is decoded once. Pure numpy and PIL:
    safe to call on the prefetch thread."""

    def __init__(
        self, examples: Sequence[Example], processor: Processor, pad_multiple: int = 8, image_cache: int = 1024
    ):
        self.examples = list(examples)
        self.processor = processor
        self.pad_multiple = pad_multiple
        self.image_cache = image_cache
        self._pixels: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._tokens: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def pixels_u8(self, path: Path) -> np.ndarray:
        arr = self._pixels.get(path)
        if arr is not None:
            self._pixels.move_to_end(path)
            return arr
        size = self.processor.image_size
        try:
            rgb = to_rgb(load_image(path)).resize((size, size), resample=Image.Resampling.BICUBIC)
        except ProcessorError as e:
            raise DataError(str(e)) from None
        arr = np.asarray(rgb, dtype=np.uint8)
        if self.image_cache:
            self._pixels[path] = arr
            while len(self._pixels) > self.image_cache:
                self._pixels.popitem(last=False)
        return arr

    def tokens(self, i: int) -> tuple[list[int], list[int]]:
        if i not in self._tokens:
            ex = self.examples[i]
            self._tokens[i] = self.processor.prompt_ids(ex.prefix, ex.suffix)
        return self._tokens[i]

    def batch(self, indices: Sequence[int], length: Optional[int] = None) -> dict[str, np.ndarray]:
        """Left-padded like the processor (to a multiple of `pad_multiple`, which bounds recompilation)."""
        p = self.processor
        rows = [self.tokens(i) for i in indices]
        L = length or max(len(ids) for ids, _ in rows)
        L = -(-L // self.pad_multiple) * self.pad_multiple
        n = len(rows)
        input_ids = np.full((n, L), p.tokenizer.pad_id, np.int32)
        attention_mask = np.zeros((n, L), np.int32)
        token_type_ids = np.zeros((n, L), np.int32)
        for r, (ids, types) in enumerate(rows):
            input_ids[r, L - len(ids) :] = ids
            attention_mask[r, L - len(ids) :] = 1
            token_type_ids[r, L - len(ids) :] = types
        u8 = np.stack([self.pixels_u8(self.examples[i].image) for i in indices]).astype(np.float32)
        x = u8.transpose(0, 3, 1, 2) * np.float32(p.rescale_factor)
        pixel_values = (x - p.image_mean[None]) / p.image_std[None]
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values.astype(np.float32),
        )

    def loss_span(self, indices: Sequence[int], length: int) -> int:
        """How many final positions hold every suffix token and the prefix position before the first
        (a multiple of `pad_multiple`, at most `length`): logits are computed there only."""
        suffix = max(sum(self.tokens(i)[1]) for i in indices) + 1
        return min(-(-suffix // self.pad_multiple) * self.pad_multiple, length)

    def max_length(self) -> int:
        return max(len(self.tokens(i)[0]) for i in range(len(self)))


class Prefetcher:
    """Runs `make(item)` for each item of `items` on a background thread, `depth` ahead of the consumer.

    Only numpy/PIL work belongs there (MLX streams belong to the thread that made them); the
    consumer turns the numpy arrays into MLX arrays. An exception on the thread is re-raised by
    the consumer at the item that failed; `close()` stops the thread.
    """

    _DONE = object()

    def __init__(self, items, make: Callable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items), make), daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items, make) -> None:
        try:
            for item in items:
                if not self._put((item, make(item), None)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put((None, None, e))
            return
        self._put(self._DONE)

    def __iter__(self):
        while True:
            got = self._queue.get()
            if got is self._DONE:
                return
            item, value, error = got
            if error is not None:
                raise error
            yield item, value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@functools.lru_cache(maxsize=2)
def _global_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: Optional[tuple] = None) -> list:
    """The epoch's global batches: a permutation seeded by (seed, epoch); the last short batch is dropped
    unless it is the only one. With `lengths`, each window of 64 batches is sorted by length before it is
    cut (similar lengths share a batch: less padding, fewer compiled shapes), then the batches are shuffled."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    count = max(n // batch_size, 1)
    if lengths is not None and count > 1:
        window = 64 * batch_size
        lens = np.asarray(lengths)
        for start in range(0, count * batch_size, window):
            chunk = perm[start : min(start + window, count * batch_size)]
            perm[start : start + len(chunk)] = chunk[np.argsort(lens[chunk], kind="stable")]
        batches = [perm[i * batch_size : (i + 1) * batch_size] for i in range(count)]
        return [batches[i] for i in rng.permutation(count)]
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(count)]
