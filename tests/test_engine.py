"""The engine: rows join and leave a running batch and still decode exactly as they would alone;
per-row seeds, stops and logits processors; threads; the vision-feature cache."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma.engine import Engine, Request, SamplingOptions
from tests.helpers import noise_image

# Checkpoints whose greedy answers wander (see test_generation.py); PaliGemma 2 with a sliding
# window of 8, shorter than every answer here, so joins cross the window.
CHECKPOINTS = {
    "pg1": dict(version=1, layout="hub", weight_scale=4.0, seed=7),
    "pg2": dict(version=2, layout="transformers", sliding_window=8, weight_scale=0.5, seed=7),
}
SHORT, LONG = "caption en", "answer en what is the small animal next to the blue door doing?"


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def pair(request, tmp_path_factory):
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    return mp.load(
        make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / request.param, **CHECKPOINTS[request.param])
    )


def request(processor, prompt, seed_image, **options) -> Request:
    pixels = processor.preprocess_image(noise_image(48, 40, seed=seed_image))
    return Request(processor.prompt_ids(prompt)[0], processor, pixels, options=SamplingOptions(**options))


def single(model, processor, prompt, seed_image, **options) -> list[int]:
    return mp.generate(model, processor, noise_image(48, 40, seed=seed_image), prompt, **options).token_ids


def run_until(engine, rows, condition=None):
    while not all(r.done for r in rows) and not (condition and condition()):
        engine.step()


def test_rows_that_join_a_running_batch_equal_their_single_runs(pair):
    """Greedy: the initial row, a longer prompt joining (the batch is padded), a shorter one joining later."""
    model, processor = pair
    engine = Engine(model)
    first = engine.submit(request(processor, SHORT, 1, max_tokens=20))
    for _ in range(4):
        engine.step()
    longer = engine.submit(request(processor, LONG, 2, max_tokens=14))
    engine.step()
    engine.step()
    shorter = engine.submit(request(processor, "ocr", 3, max_tokens=10))
    run_until(engine, [first, longer, shorter])
    assert engine.stats.rows_joined_running == 2
    assert first.token_ids == single(model, processor, SHORT, 1, max_tokens=20)
    assert longer.token_ids == single(model, processor, LONG, 2, max_tokens=14)
    assert shorter.token_ids == single(model, processor, "ocr", 3, max_tokens=10)


def test_a_seeded_sampled_row_gives_its_single_run_whatever_its_batch_mates(pair):
    model, processor = pair
    options = dict(max_tokens=12, temperature=1.0, seed=11)
    alone = single(model, processor, SHORT, 4, **options)
    engine = Engine(model)
    mates = [engine.submit(request(processor, LONG, 5, max_tokens=16, temperature=1.5)) for _ in range(2)]
    engine.step()
    engine.step()
    seeded = engine.submit(request(processor, SHORT, 4, **options))
    mates.append(engine.submit(request(processor, "ocr", 6, max_tokens=9, temperature=0.7, seed=1)))
    run_until(engine, [seeded, *mates])
    assert seeded.token_ids == alone
    assert len(set(alone)) > 3, f"too repetitive to prove much: {alone}"


def test_a_cancelled_row_leaves_and_its_cache_rows_are_dropped(pair):
    model, processor = pair
    engine = Engine(model)
    short = engine.submit(request(processor, SHORT, 1, max_tokens=40))
    long = engine.submit(request(processor, LONG, 2, max_tokens=40))
    for _ in range(3):
        engine.step()
    assert engine._cache.batch_size == 2
    length = engine.cache_length()
    engine.cancel(long)
    engine.step()
    assert long.done and long.finish_reason == "cancelled" and engine.running() == 1
    assert engine._cache.batch_size == 1
    # The long prompt's row set the batch's left padding; without it the short row's padding is trimmed.
    assert engine.cache_length() < length
    assert not short.done
    run_until(engine, [short])
    assert short.token_ids == single(model, processor, SHORT, 1, max_tokens=40)
    assert engine._cache is None


def test_a_short_request_sent_while_a_long_one_decodes_finishes_first(pair):
    model, processor = pair
    engine = Engine(model)
    long = engine.submit(request(processor, SHORT, 1, max_tokens=60))
    for _ in range(3):
        engine.step()
    short = engine.submit(request(processor, SHORT, 2, max_tokens=3))
    run_until(engine, [short])
    assert short.done and not long.done
    assert short.first_token - short.submitted < long.first_token - long.submitted + 1.0


def test_stop_strings_ids_and_logits_processors_apply_per_row(pair):
    model, processor = pair
    plain = mp.generate(model, processor, noise_image(48, 40, seed=1), SHORT, max_tokens=16)
    ids = plain.token_ids
    cut = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # a token new at position `cut`
    banned = ids[cut]
    seen = []

    def ban(tokens: mx.array, logits: mx.array) -> mx.array:
        seen.append(tokens.tolist())
        logits[:, banned] = -float("inf")
        return logits

    rows = mp.generate(
        model,
        processor,
        [noise_image(48, 40, seed=1)] * 3,
        [SHORT] * 3,
        max_tokens=16,
        stop=[],
        logits_processors=[[ban], [], []],
    )
    assert banned not in rows[0].token_ids and rows[1].token_ids == plain.token_ids
    assert seen[0] == [] and seen[3] == rows[0].token_ids[:3]  # this row's own ids so far
    assert rows[0].token_ids[:cut] == ids[:cut]
    by_id = mp.generate(model, processor, noise_image(48, 40, seed=1), SHORT, max_tokens=16, stop=[banned])
    assert by_id.token_ids == ids[:cut] and by_id.finish_reason == "stop"
    piece = processor.decode(ids[cut : cut + 2])
    by_text = mp.generate(model, processor, noise_image(48, 40, seed=1), SHORT, max_tokens=16, stop=piece)
    assert by_text.finish_reason == "stop" and by_text.text == plain.text[: plain.text.index(piece)]


def test_generation_from_other_threads_in_turn_and_at_once(pair):
    """MLX streams belong to a thread: the engine's stream is thread-local, and every array it keeps
    between steps is evaluated, so any thread may generate, alone or concurrently."""
    model, processor = pair
    image = noise_image(48, 40, seed=9)
    expected = mp.generate(model, processor, image, SHORT, max_tokens=10).token_ids
    results, errors = [], []

    def work():
        try:
            results.append(mp.generate(model, processor, image, SHORT, max_tokens=10).token_ids)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    both = [threading.Thread(target=work) for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join()
    assert errors == [] and results == [expected] * 3
    assert mp.generate(model, processor, image, SHORT, max_tokens=10).token_ids == expected


def test_the_same_image_asked_five_questions_runs_the_vision_tower_once(pair, monkeypatch):
    model, processor = pair
    calls = []
    original = type(model.vision_tower).__call__
    monkeypatch.setattr(
        type(model.vision_tower), "__call__", lambda self, x: calls.append(x.shape[0]) or original(self, x)
    )
    engine = Engine(model)
    image = noise_image(64, 64, seed=21)
    pixels = processor.preprocess_image(image)
    few = SamplingOptions(max_tokens=4)
    rows = [
        engine.submit(
            Request(processor.prompt_ids(f"answer en question {i}?")[0], processor, pixels.copy(), options=few)
        )
        for i in range(5)
    ]
    engine.step()  # all five admitted together: one vision pass of one image
    run_until(engine, rows)
    later = engine.submit(Request(processor.prompt_ids("caption en")[0], processor, pixels.copy(), options=few))
    run_until(engine, [later])
    assert calls == [1]
    stats = engine.snapshot()["vision_cache"]
    assert stats["misses"] == 1 and stats["hits"] == 5
    assert stats["bytes"] == processor.num_image_tokens * model.config.text_config.hidden_size * 4  # float32


def test_the_vision_cache_keeps_to_its_byte_budget(pair):
    model, processor = pair
    per_image = processor.num_image_tokens * model.config.text_config.hidden_size * 4
    engine = Engine(model, vision_cache_bytes=2 * per_image)
    for seed in range(3):
        engine.encode(processor.preprocess_image(noise_image(32, 32, seed=seed)))
    engine.encode(processor.preprocess_image(noise_image(32, 32, seed=0)))  # evicted: least recently used
    assert engine.snapshot()["vision_cache"] == {"hits": 0, "misses": 4, "bytes": 2 * per_image}


def test_torch_rows_run_through_the_same_engine(tmp_path):
    """The PyTorch reference has no joins: rows that arrive while a batch runs start with the next batch."""
    from mlx_paligemma import reference
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "pg1", **CHECKPOINTS["pg1"])
    model, processor = reference.load(path, device="cpu")
    engine = Engine(model)
    first = engine.submit(request(processor, SHORT, 1, max_tokens=6))
    engine.step()
    second = engine.submit(request(processor, "ocr", 3, max_tokens=4))
    engine.step()
    assert second.admitted is None
    run_until(engine, [first, second])
    assert second.token_ids == single(model, processor, "ocr", 3, max_tokens=4)
    assert np.all(first.token_ids == single(model, processor, SHORT, 1, max_tokens=6))


def test_deleting_the_model_frees_it_and_its_engine(tmp_path):
    """The model owns its engine (the vision cache lasts between calls); the engine must not own the model back,
    or `del model` would keep the weights alive until a garbage-collection cycle (seen: a second model loaded
    in the same process measured the first one's bytes in its peak)."""
    import gc
    import weakref

    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    model, processor = mp.load(make_tiny_checkpoint(tmp_path / "pg1", **CHECKPOINTS["pg1"]))
    mp.generate(model, processor, noise_image(48, 40, seed=1), SHORT, max_tokens=3)
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()


def test_on_the_cpu_the_engine_uses_the_stepping_thread_default_stream(monkeypatch):
    """A CPU stream of its own would be a second thread calling MKL, after which Intel OpenMP runs the
    first thread's matmuls at half speed (engine_stream's docstring has the measurement). On a GPU the
    engine keeps a stream of its own per thread, as mlx-lm does (device stubbed here)."""
    from mlx_paligemma import engine as engine_module

    assert engine_module.engine_stream(mx.Device(mx.cpu)) == mx.Device(mx.cpu)
    made = []
    monkeypatch.setattr(engine_module.mx, "new_thread_local_stream", lambda d: made.append(d) or "own stream")
    assert engine_module.engine_stream(mx.Device(mx.gpu)) == "own stream" and made == [mx.Device(mx.gpu)]


def test_a_cpu_engine_steps_on_whichever_thread_drives_it(pair):
    """With the device as its stream, each driving thread computes on its own default stream: rows
    decoded from a thread other than the one that made the engine give the same tokens."""
    model, processor = pair
    expected = single(model, processor, SHORT, 3, max_tokens=6)
    out = {}
    worker = threading.Thread(target=lambda: out.update(ids=single(model, processor, SHORT, 3, max_tokens=6)))
    worker.start()
    worker.join()
    assert out["ids"] == expected
