"""`server --shard` under `mlx.launch -n 2 --backend ring` (loopback): rank 0 serves, rank 1 follows its steps.

One launch: a chat request, a grammar-constrained detect task, and a request that joins while another
decodes each answer exactly as the single-process server does (greedy); then rank 0 is stopped as
Ctrl-C would stop it and both ranks exit cleanly (rank 1 because rank 0 tells it to).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

import mlx_paligemma as mp
from mlx_paligemma.engine import Engine, Request, SamplingOptions
from mlx_paligemma.grammar import answer_grammar
from mlx_paligemma.server.app import create_app
from mlx_paligemma.server.follower import Follower, Leader, RowRecord, StepRecord
from tests.helpers import noise_image
from tests.server_helpers import chat_body, data_url, live_server

LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
TOKENS = 12
LONG = 48  # the first request of the pair: still decoding when the second comes


def test_a_step_record_survives_its_bytes():
    import numpy as np

    pixels = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    options = {"max_tokens": 5, "temperature": 0.7, "seed": 3, "stop": ["x", 7]}
    record = StepRecord([RowRecord(4, [1, 2, 3], pixels, options, ("detect", ["cat", "dog"]))], cancel=[1, 2])
    back = StepRecord.decode(record.encode())
    assert (back.cancel, back.reset, back.stop) == ([1, 2], False, False)
    (row,) = back.rows
    assert (row.seq, row.input_ids, row.options, row.grammar) == (4, [1, 2, 3], options, ("detect", ["cat", "dog"]))
    np.testing.assert_array_equal(row.pixel_values, pixels)
    assert StepRecord.decode(StepRecord(stop=True).encode()).stop


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny PaliGemma 2 of test_server.py, whose greedy answers vary with image and prompt."""
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("srv") / "pg2", version=2, layout="transformers", weight_scale=0.5, seed=7
    )


class Recorder(Leader):
    """Rank 0's side with the records kept instead of broadcast."""

    def __init__(self):
        super().__init__(mx.distributed.init())
        self.records: list[StepRecord] = []

    def send(self, record: StepRecord) -> None:
        self.records.append(StepRecord.decode(record.encode()))  # through the bytes, as between ranks


def test_a_follower_replays_rank0s_steps(ckpt):
    """One process plays both ranks: a follower engine fed rank 0's records decodes the same rows, step by
    step (greedy, seeded sampling, a grammar, a row cancelled while waiting, one cancelled while running,
    one that joins the running batch); rank 0 holds each change until its step announces it."""
    model, processor = mp.load(ckpt)
    leader, follower = Engine(model, max_batch=3), Engine(model, max_batch=3)
    leader.sync = recorder = Recorder()
    image = processor.preprocess_image(noise_image(64, 48, seed=1))

    def request(prompt, **options):
        grammar = answer_grammar(processor, prompt)
        options = SamplingOptions(logits_processors=[grammar] if grammar else [], **options)
        return Request(processor.prompt_ids(prompt)[0], processor, image, options=options)

    rows = [
        leader.submit(request("caption en", max_tokens=10)),
        leader.submit(request("detect cat ; dog", max_tokens=12)),
        leader.submit(request("caption en", max_tokens=10, temperature=1.0, seed=4)),
        leader.submit(request("answer en what is it?", max_tokens=10)),  # waits: max_batch 3
    ]
    leader.cancel(rows[3])
    assert not rows[3].cancelled and leader.waiting() == 4 and not recorder.records  # nothing before the step
    leader.step()
    assert [r.seq for r in recorder.records[0].rows] == [0, 1, 2, 3] and recorder.records[0].cancel == [3]
    rows.append(leader.submit(request("caption en", max_tokens=8, temperature=0.8, seed=1)))  # joins
    leader.step()
    leader.cancel(rows[0])
    while leader.has_work():
        leader.step()
    leader.close()
    assert recorder.records[-1].stop

    replay, replayed = Follower(follower, processor), []
    submit = follower.submit
    follower.submit = lambda request, emit=None: replayed.append(submit(request, emit)) or replayed[-1]
    for record in recorder.records[:-1]:
        assert replay.apply(record)
        assert follower.running() == len([r for r in replay.rows.values() if r.admitted is not None])
    assert not replay.apply(recorder.records[-1]) and not follower.has_work() and not replay.rows
    assert [r.finish_reason for r in rows] == ["cancelled", "length", "length", "cancelled", "length"]
    assert [(r.token_ids, r.finish_reason) for r in replayed] == [(r.token_ids, r.finish_reason) for r in rows]
    assert leader.stats.rows_joined_running == follower.stats.rows_joined_running == 1
    assert leader.stats.steps == follower.stats.steps


def _requests(url: str) -> dict:
    """The same requests to either server: chat, a constrained detect task, and a pair where the second
    joins while the first (streamed) decodes."""
    image, other = data_url(noise_image(64, 48, seed=1)), data_url(noise_image(50, 70, seed=2))
    out = {}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(image, "caption en", max_tokens=TOKENS), timeout=120)
    assert r.status_code == 200, r.text
    out["chat"] = r.json()["choices"][0]["message"]["content"]
    detect = {"image": other, "labels": "cat ; dog", "max_tokens": 24}
    r = httpx.post(f"{url}/v1/tasks/detect", json=detect, timeout=120)
    assert r.status_code == 200, r.text
    out["detect"] = r.json()["text"]

    joined: dict = {}

    def second() -> None:
        body = chat_body(other, "answer en what is in the picture?", max_tokens=TOKENS)
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        joined["text"] = answer["choices"][0]["message"]["content"]

    body = chat_body(image, "caption en", max_tokens=LONG, stream=True)
    chunks, thread = [], threading.Thread(target=second)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():  # read as they come (sse_events reads the whole stream first)
            if not line.startswith("data: {"):
                continue
            chunks.append(event := json.loads(line[len("data: ") :]))
            if thread.ident is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                thread.start()  # the first streamed text: the first request is decoding
    if thread.ident is None:  # no text before the end: the pair ran one after the other (the test says so below)
        thread.start()
    thread.join(120)
    out["first"] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    out["second"] = joined["text"]
    out["joined"] = httpx.get(f"{url}/v1/stats", timeout=30).json()["rows_joined_while_running"]
    return out


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_two_rank_server_answers_as_one_process(ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "launch.log", "w+")  # noqa: SIM115 -- read while the launch runs
    launch = subprocess.Popen(
        [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, "-m", "tests.two_rank_server"]
        + [str(tmp_path), "--model", str(ckpt), "--shard", "--port", "0", "--max-batch", "4"]
        + ["--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, to clean up after a failure
    )
    try:
        deadline, url = time.monotonic() + 300, None
        while url is None:
            assert launch.poll() is None, (tmp_path / "launch.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "launch.log").read_text()
            found = re.search(r"serving \S+ on (http://\S+)/", (tmp_path / "launch.log").read_text())
            url = found.group(1) if found else None
            time.sleep(0.2)
        sharded = _requests(url)

        os.kill(int((tmp_path / "rank0.pid").read_text()), signal.SIGINT)  # Ctrl-C on rank 0
        launch.wait(timeout=60)
        # Rank 0 shuts down cleanly and says "interrupted" (130, as one process does); rank 1 stops when told.
        statuses = [(tmp_path / f"rank{r}.exit").read_text() for r in (0, 1)]
        assert statuses == ["130", "0"], (tmp_path / "launch.log").read_text()
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
        log.close()

    model, processor = mp.load(ckpt)
    with live_server(create_app(model, processor, model_id="tiny", max_batch=4)) as one_url:
        alone = _requests(one_url)
    assert sharded["joined"] >= 1  # the second request joined the running batch
    for key in ("chat", "detect", "first", "second"):
        assert sharded[key] == alone[key], key
    assert sharded["detect"].count("<loc") >= 4  # the constrained answer: boxes, on both sides
