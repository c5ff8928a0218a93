"""The Apple-silicon generation session: wired limit raised while generating and restored, cache cleared
after, nothing at all on the CPU. The Metal calls are replaced by recorders (no Mac here)."""

from __future__ import annotations

import mlx.core as mx
import pytest

import mlx_paligemma as mp
from mlx_paligemma import accel
from tests.helpers import noise_image


@pytest.fixture
def calls(monkeypatch):
    log = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: log.append(("wired", n)) or 1234)
    monkeypatch.setattr(mx, "clear_cache", lambda: log.append(("clear",)))
    monkeypatch.setattr(mx, "synchronize", lambda *a: log.append(("sync",)))
    monkeypatch.setattr(accel, "_device_info", lambda: {"max_recommended_working_set_size": 10**9})
    return log


def test_cpu_is_left_alone(pg1_dir, calls):
    assert not accel.on_gpu()
    model, processor = mp.load(pg1_dir)
    mp.generate(model, processor, noise_image(40, 30), "caption en", max_tokens=3)
    assert calls == []


def test_gpu_session_raises_and_restores_the_wired_limit(pg1_dir, calls, monkeypatch):
    monkeypatch.setattr(accel, "on_gpu", lambda: True)
    model, _ = mp.load(pg1_dir)
    with accel.generation_session(model):
        assert calls == [("wired", 10**9)]
    assert calls == [("wired", 10**9), ("sync",), ("wired", 1234), ("clear",)]


def test_breaking_out_of_a_stream_ends_the_session(pg1_dir, calls, monkeypatch):
    model, processor = mp.load(pg1_dir)
    monkeypatch.setattr(accel, "on_gpu", lambda: True)
    stream = mp.stream_generate(model, processor, noise_image(40, 30), "caption en", max_tokens=5)
    next(stream)
    assert calls == [("wired", 10**9)]
    stream.close()
    assert calls[-2:] == [("wired", 1234), ("clear",)]
