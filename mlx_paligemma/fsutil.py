"""Writing files the user owns: never half-written, never with surprising permissions.

Everything the package writes for the user (drawn images, checkpoints, adapters, JSON) goes to a
temporary name beside the target and is renamed over it only when complete, so an interrupted
run leaves either the old file or the new one. `tempfile.mkstemp` creates files with mode 0600;
the result is given the mode any new file gets under the user's umask (usually 0644).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def _umask_mode(base: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed to `target` (mode per umask).

    On an exception the temporary file is removed and `target` is left as it was. `suffix` ends the
    temporary name, for writers that insist on an extension (`mx.save_safetensors` appends
    ".safetensors" to any other name).
    """
    target = Path(target).resolve()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode(0o666))
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it becomes `target`.

    With `replace`, an existing `target` is removed only after the new directory is complete
    (and put back if the final rename fails).
    The directory gets the mode a new directory gets under the user's umask.
    """
    target = Path(target).resolve()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists")
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # the old directory comes back if the new one cannot go in
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
