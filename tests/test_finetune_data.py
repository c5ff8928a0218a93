"""Data that scales: a bounded image cache that gives the same batches, and the prefetch thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mlx_paligemma import finetune as ft
from mlx_paligemma.config import load_config
from mlx_paligemma.processor import Processor
from tests.test_finetune import _write_data


def test_bounded_image_cache_gives_the_same_batches(pg1_dir, tmp_path):
    examples = ft.read_jsonl(_write_data(tmp_path / "data", n=6))
    processor = Processor.from_dir(pg1_dir, load_config(pg1_dir))
    unbounded = ft.Batcher(examples, processor, image_cache=1024)
    bounded = ft.Batcher(examples, processor, image_cache=2)
    for indices in ([0, 1, 2], [3, 4, 5], [5, 0, 3]):
        a, b = unbounded.batch(indices), bounded.batch(indices)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert len(bounded._pixels) <= 2
    assert len(unbounded._pixels) == 6


def test_prefetcher_yields_in_order_on_another_thread_and_raises_where_it_failed():
    threads = set()

    def make(i):
        threads.add(threading.get_ident())
        if i == 3:
            raise ValueError("bad item 3")
        return i * i

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item, value in ft.Prefetcher(range(10), make, depth=2):
            got.append((item, value))
    assert got == [(0, 0), (1, 1), (2, 4)]
    assert threading.get_ident() not in threads

    prefetch = ft.Prefetcher(iter(range(10**9)), lambda i: i, depth=2)  # endless: close() must stop it
    assert next(iter(prefetch)) == (0, 0)
    prefetch.close()
    assert not prefetch._thread.is_alive()
