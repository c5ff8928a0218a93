"""The local server: OpenAI-compatible answers equal `mp.generate`, batching, refusals, keys, the CLI."""

from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma.grammar import answer_grammar
from mlx_paligemma.server.app import Limits, create_app
from tests.helpers import noise_image
from tests.server_helpers import chat_body, data_url, live_server, sse_events

TOKENS = 12


@pytest.fixture(scope="module")
def gen_ckpt(tmp_path_factory):
    """A tiny PaliGemma 2 whose greedy answers vary with image and prompt (see test_generation.py)."""
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("srv") / "pg2", version=2, layout="transformers", weight_scale=0.5, seed=7
    )


@pytest.fixture(scope="module")
def pair(gen_ckpt):
    return mp.load(gen_ckpt)


@pytest.fixture(scope="module")
def limits():
    # Small caps, so that each can be crossed by a small request.
    return Limits(max_body_bytes=200_000, max_image_bytes=100_000, max_image_pixels=300 * 300, max_tokens=64)


@pytest.fixture(scope="module")
def app(pair, limits):
    model, processor = pair
    return create_app(model, processor, model_id="tiny-pg2", max_batch=8, limits=limits)


@pytest.fixture(scope="module")
def url(app):
    with live_server(app) as base:
        yield base


def post(url: str, **kwargs) -> httpx.Response:
    """httpx.post with room for a slow, shared CI machine (the default read timeout is 5 s)."""
    kwargs.setdefault("timeout", 60)
    return httpx.post(url, **kwargs)


def single(pair, image, prompt, max_tokens=TOKENS):
    return mp.generate(*pair, image, prompt, max_tokens=max_tokens)


def test_chat_completion_equals_generate(url, pair):
    image = noise_image(64, 48, seed=1)
    r = post(f"{url}/v1/chat/completions", json=chat_body(data_url(image), "caption en", max_tokens=TOKENS))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = single(pair, image, "caption en")
    assert body["object"] == "chat.completion" and body["model"] == "tiny-pg2"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    prompt_tokens = len(pair[1].prompt_ids("caption en")[0])
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(expected.token_ids),
        "total_tokens": prompt_tokens + len(expected.token_ids),
    }
    assert body["timings"]["prompt_per_second"] > 0 and body["timings"]["batch_size"] == 1


def test_streamed_chat_equals_generate(url, pair):
    image = noise_image(50, 70, seed=2)
    prompt = "answer en what is in the picture?"
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=chat_body(data_url(image, "JPEG"), prompt, max_tokens=TOKENS, stream=True),
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    expected = mp.generate(*pair, _jpeg_roundtrip(image), prompt, max_tokens=TOKENS)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.token_ids)
    assert len(chunks) > 3  # it really streamed


def _jpeg_roundtrip(image):
    """What the server sees of an image sent as JPEG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, "JPEG")
    return Image.open(io.BytesIO(buf.getvalue()))


def test_openai_client_gets_the_same_answer(url, pair):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    image = noise_image(40, 40, seed=3)
    messages = chat_body(data_url(image), "caption en")["messages"]
    expected = single(pair, image, "caption en").text
    out = client.chat.completions.create(model="tiny-pg2", messages=messages, max_tokens=TOKENS)
    assert out.choices[0].message.content == expected
    pieces = client.chat.completions.create(model="tiny-pg2", messages=messages, max_tokens=TOKENS, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == expected
    assert [m.id for m in client.models.list().data] == ["tiny-pg2"]


def test_health_and_models(url):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-pg2"


def _png_bytes(width, height):
    """A flat image: few bytes, many pixels."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


GOOD = data_url(noise_image(20, 20, seed=9))


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", chat_body("data:image/png;base64,@@@notbase64", "caption en"), 400, "bad base64"),
        (
            "/v1/chat/completions",
            chat_body("data:image/png;base64," + base64.b64encode(b"hello").decode(), "x"),
            400,
            "not an image",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "caption en"}]}, 400, "no image"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", max_tokens=0), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", max_tokens=65), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", max_tokens="5"), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", temperature=-1), 400, "temperature"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", top_p=0), 400, "top_p"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", seed=-3), 400, "seed"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", stream="yes"), 400, "stream"),
        ("/v1/chat/completions", chat_body(GOOD, "caption en", n=2), 400, "n:"),
        ("/v1/chat/completions", chat_body("https://example.com/cat.png", "caption en"), 400, "not fetched"),
        ("/v1/chat/completions", chat_body("data:image/png;base64," + "A" * 150_000, "caption en"), 413, "limit"),
        (
            "/v1/chat/completions",
            chat_body("data:image/png;base64," + base64.b64encode(_png_bytes(400, 300)).decode(), "caption en"),
            413,
            "pixel",
        ),
        ("/v1/chat/completions", b"{" + b" " * 250_000 + b"}", 413, "body"),
        ("/v1/tasks/answer", {"image": GOOD}, 400, "question"),
        ("/v1/tasks/detect", {"image": GOOD, "labels": []}, 400, "labels"),
        ("/v1/tasks/detect", {"image": GOOD, "labels": "cat", "constrain": "yes"}, 400, "constrain"),
        ("/v1/tasks/caption", {"lang": "en"}, 400, "image"),
        ("/v1/tasks/caption", {"image": GOOD, "lang": "en; rm"}, 400, "lang"),
        ("/v1/tasks/dance", {"image": GOOD}, 404, "unknown task"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_request_gets_its_status(url, caplog, path, body, status, needle):
    caplog.set_level(logging.WARNING, logger="mlx_paligemma.server")
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = post(f"{url}{path}", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    logged = [rec for rec in caplog.records if rec.name == "mlx_paligemma.server"]
    assert len(logged) == 1 and f"-> {status}" in logged[0].getMessage() and "\n" not in logged[0].getMessage()
    assert httpx.get(f"{url}/health").status_code == 200  # and the server lives on


def test_a_full_queue_is_a_503(pair):
    app = create_app(*pair, limits=Limits(max_queued=1))
    batcher = app.state.batcher
    release = threading.Event()
    held = batcher.call(release.wait)
    body = chat_body(GOOD, "caption en", max_tokens=2)
    with live_server(app) as url, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, f"{url}/v1/chat/completions", json=body, timeout=60)
        while batcher.queued() < 1:
            time.sleep(0.01)
        busy = post(f"{url}/v1/chat/completions", json=body)
        release.set()
        assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        assert waiting.result().status_code == 200
    held.result()


def test_wrong_method_is_a_json_405(url):
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key_is_enforced(pair):
    app = create_app(*pair, model_id="k", api_key="s3cret")
    body = chat_body(GOOD, "caption en", max_tokens=2)
    with live_server(app) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Basic s3cret"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no key
        assert httpx.get(f"{url}/").status_code == 200  # nor the page (which asks for the key)


def test_file_urls_need_the_flag(pair, tmp_path, url, caplog):
    image = noise_image(30, 40, seed=4)
    path = tmp_path / "local.png"
    image.save(path)
    body = chat_body(path.as_uri(), "caption en", max_tokens=TOKENS)
    refused = post(f"{url}/v1/chat/completions", json=body)
    assert refused.status_code == 400 and "--allow-local-files" in refused.json()["error"]["message"]
    with live_server(create_app(*pair, allow_local_files=True)) as allowed:
        r = post(f"{allowed}/v1/chat/completions", json=body)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == single(pair, path, "caption en").text
        caplog.set_level(logging.WARNING, logger="mlx_paligemma.server")
        caplog.clear()
        odd = (tmp_path / "no\nsuch.png").as_uri()  # a newline in the path must not split the log line
        missing = post(f"{allowed}/v1/chat/completions", json=chat_body(odd, "x"))
        assert missing.status_code == 400 and "no\nsuch.png" in missing.json()["error"]["message"]
        logged = [r.getMessage() for r in caplog.records if r.name == "mlx_paligemma.server"]
        assert len(logged) == 1 and "\n" not in logged[0] and "no\\nsuch" in logged[0]


def test_concurrent_requests_share_the_batch_and_equal_single_runs(url, app, pair):
    """16 clients at once, while the worker is held busy: 8 start together, the others join the running
    batch as rows finish (continuous batching), and every answer equals its single run."""
    prompts = ["caption en", "answer en what colour is it?", "caption fr", "detect cat ; dog"]
    cases = [(noise_image(30 + 7 * i, 60 - 2 * i, seed=100 + i), prompts[i % 4], 4 + i % 9) for i in range(16)]
    batcher = app.state.batcher
    before = batcher.snapshot()
    release = threading.Event()
    held = batcher.call(release.wait)  # the worker waits here while all 16 requests queue

    def ask(case):
        image, prompt, max_tokens = case
        r = httpx.post(
            f"{url}/v1/chat/completions", json=chat_body(data_url(image), prompt, max_tokens=max_tokens), timeout=60
        )
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, case) for case in cases]
        deadline = time.monotonic() + 30
        while batcher.queued() < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        answers = [f.result() for f in futures]
    held.result()
    after = batcher.snapshot()
    assert after["recent_batch_sizes"][len(before["recent_batch_sizes"])] == 8  # the first 8 start together
    assert after["largest_batch"] == 8
    assert after["rows_joined_while_running"] - before["rows_joined_while_running"] == 8
    for (image, prompt, max_tokens), answer in zip(cases, answers):
        expected = single(pair, image, prompt, max_tokens)
        assert answer["choices"][0]["message"]["content"] == expected.text
        assert answer["usage"]["completion_tokens"] == len(expected.token_ids)
        assert 1 <= answer["timings"]["batch_size"] <= 8 and answer["timings"]["ttft_ms"] > 0


def test_an_over_long_prompt_fails_alone(url, app, pair):
    """7 good requests and one whose prompt exceeds the model's positions, sent together: 7 right
    answers and one 400 (refused at admission, before it could meet a batch-mate)."""
    model, processor = pair
    limit = model.config.text_config.max_position_embeddings
    too_long = "answer en " + "why " * (limit - processor.num_image_tokens)
    cases = [(noise_image(40, 40, seed=200 + i), "caption en" if i != 5 else too_long) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(post, f"{url}/v1/chat/completions", json=chat_body(data_url(im), p, max_tokens=6))
            for im, p in cases
        ]
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200] * 5 + [400] + [200] * 2
    assert "the prompt is" in replies[5].json()["error"]["message"]
    for (image, prompt), reply in zip(cases, replies):
        if reply.status_code == 200:
            assert reply.json()["choices"][0]["message"]["content"] == single(pair, image, prompt, 6).text


def test_stats_report_joins_time_to_first_token_and_the_vision_cache(url, app, pair):
    """The same image asked five questions: the vision tower runs once, the cache says so."""
    batcher = app.state.batcher
    image = data_url(noise_image(50, 44, seed=300))
    before = batcher.snapshot()["vision_cache"]
    for i in range(5):
        r = post(f"{url}/v1/chat/completions", json=chat_body(image, f"answer en question {i}?", max_tokens=3))
        assert r.status_code == 200
    stats = batcher.snapshot()
    cache = stats["vision_cache"]
    assert cache["misses"] - before["misses"] == 1 and cache["hits"] - before["hits"] == 4
    assert cache["bytes"] > 0
    assert stats["time_to_first_token_ms"]["p50"] > 0 and len(stats["time_to_first_token_ms"]["recent"]) >= 5
    assert "rows_joined_while_running" in stats


def test_seeded_sampling_is_reproducible_in_any_batch(url, app, pair):
    """Two sampled requests with one seed share a batch: each equals the single run (per-row random keys)."""
    image = noise_image(36, 36, seed=12)
    batcher = app.state.batcher
    release = threading.Event()
    held = batcher.call(release.wait)
    body = chat_body(data_url(image), "caption en", max_tokens=TOKENS, temperature=1.5, seed=11)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post, f"{url}/v1/chat/completions", json=body, timeout=60) for _ in range(2)]
        while batcher.queued() < 2:
            time.sleep(0.01)
        release.set()
        replies = [f.result().json() for f in futures]
    held.result()
    texts = [r["choices"][0]["message"]["content"] for r in replies]
    assert [r["timings"]["batch_size"] for r in replies] == [2, 2]
    expected = mp.generate(*pair, image, "caption en", max_tokens=TOKENS, temperature=1.5, seed=11).text
    assert texts == [expected, expected]
    assert expected != single(pair, image, "caption en").text  # it really sampled


def test_a_disconnected_stream_frees_its_row(pair):
    """The client leaves after the first tokens of a 2000-token answer: its batch stops at once."""
    app = create_app(*pair, limits=Limits(max_tokens=2000))
    batcher = app.state.batcher
    body = chat_body(GOOD, "caption en", max_tokens=2000, stream=True)
    with live_server(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if '"content":' in line and '"content":""' not in line.replace(" ", ""):
                    break  # a token: the row is being decoded
        deadline = time.monotonic() + 20
        while batcher.snapshot()["cancelled_rows"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = batcher.snapshot()
        assert stats["cancelled_rows"] == 1 and stats["requests_completed"] == 0
        ok = post(f"{url}/v1/chat/completions", json=chat_body(GOOD, "caption en", max_tokens=2))
        assert ok.status_code == 200
        # The same without streaming: the client gives up waiting and closes the connection.
        with pytest.raises(httpx.ReadTimeout):
            post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=1))
        deadline = time.monotonic() + 20
        while batcher.snapshot()["cancelled_rows"] == 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert batcher.snapshot()["cancelled_rows"] == 2 and batcher.snapshot()["requests_completed"] == 1


def test_task_endpoints_return_structured_results(url, pair):
    image = noise_image(80, 60, seed=5)
    img = data_url(image)
    caption = post(f"{url}/v1/tasks/caption", json={"image": img, "lang": "de", "max_tokens": TOKENS}).json()
    assert caption["text"] == single(pair, image, "caption de").text and caption["prompt"] == "caption de"
    answer = post(f"{url}/v1/tasks/answer", json={"image": img, "question": "why?", "max_tokens": 4}).json()
    assert answer["text"] == single(pair, image, "answer en why?", 4).text
    # detect and segment are constrained to the answer grammar by default, as mp.detect is; "constrain": false
    # gives the model's free answer
    detect = post(f"{url}/v1/tasks/detect", json={"image": img, "labels": "cat ; dog", "max_tokens": 40}).json()
    grammar = answer_grammar(pair[1], "detect cat ; dog")
    expected = mp.generate(*pair, image, "detect cat ; dog", max_tokens=40, logits_processors=[grammar])
    assert detect["text"] == expected.text and detect["image_size"] == [80, 60]
    assert detect["detections"] == [d.to_dict() for d in mp.detect(*pair, image, ["cat", "dog"], max_tokens=40)]
    free = post(
        f"{url}/v1/tasks/detect", json={"image": img, "labels": "cat ; dog", "max_tokens": 40, "constrain": False}
    )
    assert free.json()["text"] == single(pair, image, "detect cat ; dog", 40).text
    segment = post(f"{url}/v1/tasks/segment", json={"image": img, "labels": ["cat"], "max_tokens": 40}).json()
    assert segment["prompt"] == "segment cat" and segment["masks"] is False


def test_streamed_task_ends_with_its_result(url, pair):
    image = noise_image(44, 44, seed=6)
    with httpx.stream(
        "POST", f"{url}/v1/tasks/caption", json={"image": data_url(image), "max_tokens": 8, "stream": True}, timeout=60
    ) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and "result" in events[-2]
    text = "".join(e["delta"] for e in events[:-2])
    assert text == events[-2]["result"]["text"] == single(pair, image, "caption en", 8).text


def test_segment_masks_are_coco_rle(pg1_dir, tmp_path_factory):
    """With a mask decoder loaded, each object carries its mask as COCO RLE: decoded by pycocotools, it
    equals the mask `mp.parse_segmentations` pastes for the same answer (real model, decoder and batcher)."""
    from pycocotools import mask as coco

    from tests.test_segmentation import ANSWER
    from tools.make_random_mask_decoder import make_random_mask_decoder
    from tools.make_scripted_checkpoint import make_scripted_checkpoint

    scripted = make_scripted_checkpoint(pg1_dir, tmp_path_factory.mktemp("srv-seg") / "pg1", ANSWER)
    npz = make_random_mask_decoder(tmp_path_factory.mktemp("srv-dec") / "vae-oid.npz", 64, seed=5)
    decoder = mp.load_mask_decoder(npz)
    image = noise_image(80, 60)
    with live_server(create_app(*mp.load(scripted), mask_decoder=decoder)) as url:
        r = post(f"{url}/v1/tasks/segment", json={"image": data_url(image), "labels": "cat ; dog", "max_tokens": 60})
    out = r.json()
    assert r.status_code == 200 and out["masks"] is True
    expected = mp.parse_segmentations(ANSWER, (80, 60), decoder)
    assert [seg["label"] for seg in out["segmentations"]] == [e.label for e in expected] == ["cat", "dog"]
    for seg, ref in zip(out["segmentations"], expected):
        rle = coco.frPyObjects(seg["mask"], *seg["mask"]["size"])
        assert np.array_equal(coco.decode(rle).astype(bool), ref.mask)
        assert ref.mask.any() and not ref.mask.all()


def test_cli_serves_on_a_free_port(gen_ckpt):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "mlx_paligemma.server",
        "--model",
        str(gen_ckpt),
        "--port",
        "0",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "serving" in line and "http://127.0.0.1:" in line, line
        base = line.split("on ", 1)[1].split()[0].rstrip("/")
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"{base}/health").json()["model"] == gen_ckpt.name
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(20)


def test_cli_port_in_use_is_one_line(gen_ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "mlx_paligemma.server", "--model", str(gen_ckpt), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot listen" in r.stderr


def test_without_model_or_demo_says_pass_model(monkeypatch):
    from mlx_paligemma.server.__main__ import _load, build_parser

    def no_demo(path, **kwargs):
        raise mp.CheckpointError(f"{path}: no such directory")

    monkeypatch.setattr(mp, "load", no_demo)
    with pytest.raises(mp.PaliGemmaError, match="pass --model"):
        _load(build_parser().parse_args([]))
