"""The parts of a dataset-scale batch job (`mlx-paligemma batch`): what to run, where results go, and how
ranks share the work.

- `Item`s come from a folder of images (recursively), JSON lines `{image, prompt}`, or a Hugging Face
  `datasets` directory / parquet file with an image column (only then is `datasets` imported).
- `ResultsFile` appends whole chunks of JSON lines (one `write` of complete lines, then `fsync`), so
  the file only ever ends between lines; resuming counts its rows, checks they are the input's first
  ones, and carries on after them. A kill loses at most the chunk being computed.
- `gather_rows`: under `mlx.launch` each rank computes every N-th item of a chunk and the encoded
  rows are `all_gather`ed to every rank, so rank 0 writes one file in input order. Bytes through
  `mx.distributed`, not part files, because two Macs share no disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .errors import MissingDependencyError, PaliGemmaError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Item:
    """One image and its prompt; `image` is the name written in its result row."""

    image: str
    prompt: str
    source: Any  # what `Processor.load_image` reads: a path, or a callable returning the image

    def load(self) -> Any:
        return self.source() if callable(self.source) else self.source


def folder_items(folder: Path, prompt: str) -> list[Item]:
    """Every image file under `folder`, recursively, in sorted path order; rows name them relative to it."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [Item(p.relative_to(folder).as_posix(), prompt, p) for p in paths]


def jsonl_items(path: Path, prompt: Optional[str]) -> list[Item]:
    """JSON lines `{"image": PATH, "prompt": P}` (image paths relative to the file); a line's prompt wins
    over `prompt`. Every malformed line is reported at once, by number, before anything runs."""
    items, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not JSON ({e.msg})")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            problems.append(f'line {number}: expected an object with an "image" path')
            continue
        line_prompt = entry.get("prompt", prompt)
        if not isinstance(line_prompt, str):
            problems.append(f'line {number}: no "prompt" (give one per line, or --prompt)')
            continue
        items.append(Item(entry["image"], line_prompt, path.parent / entry["image"]))
    if problems:
        raise PaliGemmaError(f"--data {path}: " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
    return items


def dataset_items(path: Path, prompt: Optional[str], image_column: str, prompt_column: str) -> list[Item]:
    """A `datasets.save_to_disk` directory or a parquet file; rows are named `NAME[index]`."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"--data {path}: reading a Hugging Face dataset needs the `datasets` package (pip install datasets)"
        ) from None
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            raise PaliGemmaError(f"--data {path}: a DatasetDict of {list(data)}; pass one split's directory")
    else:
        data = datasets.Dataset.from_parquet(str(path))
    if image_column not in data.column_names:
        raise PaliGemmaError(f"--data {path}: no column {image_column!r} (columns: {', '.join(data.column_names)})")
    prompts = data[prompt_column] if prompt_column in data.column_names else None
    if prompts is None and prompt is None:
        raise PaliGemmaError(f"--data {path}: no column {prompt_column!r}; pass --prompt")

    def image_at(index: int) -> Callable[[], Any]:
        def load() -> Any:
            value = data[index][image_column]
            if isinstance(value, dict):  # an undecoded Image feature: {"bytes", "path"}
                import io

                from PIL import Image

                return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value["path"]
            return value

        return load

    return [
        Item(f"{path.name}[{i}]", prompts[i] if prompts is not None else prompt, image_at(i)) for i in range(len(data))
    ]


class ResultsFile:
    """The `--out` JSON-lines file: rows of the input's first items, in order, appended chunk by chunk."""

    def __init__(self, path: Path):
        self.path = path

    def done_rows(self) -> list[dict]:
        """The complete rows already written (a final line without its newline, from a crash in the middle
        of a write on a file system that tore it, is cut off and recomputed)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        try:
            return [json.loads(line) for line in complete.decode("utf-8").splitlines()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PaliGemmaError(f"--out {self.path}: not a JSON-lines results file") from None

    def check_prefix(self, rows: Sequence[dict], items: Sequence[Item]) -> None:
        """The rows must be the first items' results: else --out belongs to another input."""
        if len(rows) > len(items):
            raise PaliGemmaError(f"--out {self.path}: holds {len(rows)} rows, more than the {len(items)} inputs")
        for number, (row, item) in enumerate(zip(rows, items), 1):
            if row.get("image") != item.image or row.get("prompt") != item.prompt:
                raise PaliGemmaError(
                    f"--out {self.path}: row {number} is for {row.get('image')!r} / {row.get('prompt')!r}, but input "
                    f"{number} is {item.image!r} / {item.prompt!r}: it is the output of another input"
                )

    def append(self, lines: Sequence[bytes]) -> None:
        """Append complete lines in one write, then fsync: a kill leaves the file between chunks."""
        data = b"".join(line + b"\n" for line in lines)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def broadcast_int(value: int, group: mx.distributed.Group) -> int:
    """Rank 0's `value` on every rank."""
    if group.size() == 1:
        return value
    mine = mx.array([value if group.rank() == 0 else 0], dtype=mx.int64)
    return int(mx.distributed.all_sum(mine, group=group).item())


def broadcast_bytes(data: bytes, group: mx.distributed.Group) -> bytes:
    """Rank 0's `data` on every rank (the others pass anything, e.g. b""): its length, then the bytes.

    The bytes go through an `all_gather` (as in `gather_rows`), which moves bytes of any dtype; rank 0's row is
    kept."""
    if group.size() == 1:
        return data
    size = broadcast_int(len(data), group)
    mine = np.zeros(size, np.uint8)
    if group.rank() == 0:
        mine[:] = np.frombuffer(data, np.uint8)
    return bytes(np.array(mx.distributed.all_gather(mx.array(mine)[None], group=group)[0]))


def gather_rows(lines: Sequence[bytes], group: mx.distributed.Group) -> list[list[bytes]]:
    """Every rank's encoded rows, on every rank: `result[r]` is rank r's list, in its order.

    Two `all_gather`s: the byte counts, then the blobs padded to the longest (all_gather needs equal
    shapes)."""
    if group.size() == 1:
        return [list(lines)]
    blob = b"\n".join(lines)
    count = mx.array([len(lines), len(blob)], dtype=mx.int64)
    counts = np.array(mx.distributed.all_gather(count[None], group=group))
    longest = max(1, int(counts[:, 1].max()))
    padded = np.zeros(longest, np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, np.uint8)
    blobs = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=group))
    out = []
    for (n, size), row in zip(counts, blobs):
        out.append(bytes(row[:size]).split(b"\n") if n else [])
    return out
