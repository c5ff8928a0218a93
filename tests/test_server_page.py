"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright.

Playwright's own browser download is not used (nor reachable in CI): `.ci/run` installs Debian's
`chromium` and the test points Playwright at it. The screenshot of the answered page is kept
under pytest's tmp dir and, on a machine with /work/artifacts, copied there for the report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import mlx_paligemma as mp
from mlx_paligemma.server.app import create_app
from tests.helpers import noise_image
from tests.server_helpers import live_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path("/work/artifacts")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright import sync_api

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (.ci/run does)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1200, "height": 720},
        )
        context.set_default_timeout(60_000)  # a shared CI machine can be slow
        yield context
        context.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(
        tmp_path_factory.mktemp("page") / "pg1", version=1, layout="hub", weight_scale=4.0, seed=7
    )
    model, processor = mp.load(ckpt)
    with live_server(create_app(model, processor, model_id="tiny-pg1")) as url:
        yield url, (model, processor)


def test_page_answers_a_caption_request(browser, served, tmp_path):
    url, pair = served
    image_path = tmp_path / "photo.png"
    noise_image(160, 120, seed=21).save(image_path)
    expected = mp.generate(*pair, image_path, "answer en what is shown?", max_tokens=20).text
    assert expected.strip()

    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"outside request {r.url}") if not r.url.startswith(url) else None)
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-pg1'")
    page.set_input_files("#file", str(image_path))
    page.wait_for_function("!document.getElementById('run').disabled")
    page.select_option("#task", "answer")
    page.fill("#text", "what is shown?")
    page.fill("#max-tokens", "20")
    page.click("#run")
    page.wait_for_function("document.getElementById('speed').textContent.includes('decode')", timeout=90_000)
    assert page.inner_text("#answer") == expected.strip() or page.text_content("#answer") == expected
    assert "tok/s" in page.inner_text("#speed") and page.inner_text("#error") == ""
    shot = tmp_path / "server-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if ARTIFACTS.is_dir():
        shutil.copy(shot, ARTIFACTS / "server-page.png")
    page.close()
    assert errors == []


def test_page_shows_a_refusal(browser, served, tmp_path):
    """A request the server refuses shows its message, not a silent failure."""
    url, _ = served
    image_path = tmp_path / "p.png"
    noise_image(40, 40, seed=22).save(image_path)
    page = browser.new_page()
    page.goto(url + "/")
    page.set_input_files("#file", str(image_path))
    page.select_option("#task", "detect")
    page.fill("#text", "")
    page.wait_for_function("!document.getElementById('run').disabled")
    page.click("#run")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "labels" in page.inner_text("#error")
    page.close()


def scripted_sampling(text: str, processor):
    """A stand-in for the engine's sampler that answers `text` (token by token, then eos) in every row."""
    import mlx.core as mx

    tok = processor.tokenizer
    pieces = [p for p in text.replace(">", "> ").split(" ") if p]
    ids = [tok.piece_to_id(p) if p.startswith("<") else tok.encode(" " + p)[0] for p in pieces]

    def sample(self, rows, logits):
        return mx.array([ids[len(r.token_ids)] if len(r.token_ids) < len(ids) else tok.eos_id for r in rows], mx.int32)

    return sample


def test_page_draws_boxes_and_masks(browser, served, tmp_path, monkeypatch):
    """A segmentation answer (scripted: a random model rarely writes one) is drawn: box, label, tinted mask."""
    import numpy as np

    from mlx_paligemma.engine import Engine

    url, pair = served
    codes = "".join(f"<seg{i:03d}>" for i in range(16))
    answer = f"<loc0256><loc0128><loc0768><loc0640>{codes} cat"
    monkeypatch.setattr(Engine, "_sample", scripted_sampling(answer, pair[1]))

    class Seg:  # what parse_segmentations returns, scripted: the box's lower half is the mask
        def __init__(self, box, size):
            w, h = size
            self.label, self.box, self.codes = "cat", box, list(range(16))
            self.mask = np.zeros((h, w), bool)
            self.mask[int((box[1] + box[3]) / 2) : int(box[3]), int(box[0]) : int(box[2])] = True

    def parse_segmentations(text, image_size, decoder):
        return [Seg(d.box, image_size) for d in mp.parse_detections(text, image_size)]

    from mlx_paligemma import segmentation

    monkeypatch.setattr(segmentation, "parse_segmentations", parse_segmentations)
    image_path = tmp_path / "grey.png"
    from PIL import Image

    Image.new("RGB", (200, 160), (128, 128, 128)).save(image_path)
    with live_server(create_app(*pair, model_id="scripted", mask_decoder="fake")) as seg_url:
        page = browser.new_page()
        page.goto(seg_url + "/")
        page.set_input_files("#file", str(image_path))
        page.select_option("#task", "segment")
        page.fill("#text", "cat")
        page.wait_for_function("!document.getElementById('run').disabled")
        page.click("#run")
        page.wait_for_function("document.getElementById('speed').textContent.includes('decode')", timeout=90_000)
        assert page.inner_text("#answer") == answer
        assert "cat [25, 40, 125, 120]" in page.inner_text("#objects")  # bins / 1024 of 200x160
        # Canvas pixels, in image coordinates scaled to the canvas: inside the mask tinted, above it grey.
        pixel = """([x, y]) => { const c = document.getElementById('canvas');
            const s = c.width / 200; return Array.from(c.getContext('2d').getImageData(x * s, y * s, 1, 1).data); }"""
        in_mask, above_mask, outside = (page.evaluate(pixel, xy) for xy in ([75, 100], [75, 60], [180, 20]))
        assert outside[:3] == [128, 128, 128]
        assert above_mask[:3] == [128, 128, 128]
        assert in_mask[:3] != [128, 128, 128]
        shot = tmp_path / "server-page-segment.png"
        page.screenshot(path=str(shot), full_page=True)
        if ARTIFACTS.is_dir():
            shutil.copy(shot, ARTIFACTS / "server-page-segment.png")
        page.close()
