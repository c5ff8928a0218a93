"""The synthetic shapes task (tools/shapes.py) and its scorer (benchmarks/eval_shapes.py): new shapes and
colours draw where their boxes say, multi-class and absent-shape answers follow PaliGemma's form, and the
scorer's two new measures count what they claim."""

from __future__ import annotations

import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import mlx_paligemma.generation
from benchmarks import eval_shapes
from tools import shapes


@pytest.mark.parametrize("kind", shapes.ALL_SHAPES)
def test_every_shape_fills_its_box_and_nothing_outside(kind):
    box = (40, 60, 140, 160)
    scene = shapes.Scene((255, 255, 255), [shapes.Shape(kind, "purple", box)])
    painted = np.argwhere((np.asarray(scene.render()) != 255).any(axis=-1))
    (y0, x0), (y1, x1) = painted.min(axis=0), painted.max(axis=0)
    assert (x0, y0, x1 + 1, y1 + 1) == box  # the tight box of the drawn pixels is the answer's box


def test_the_default_vocabulary_draws_what_the_first_version_drew():
    """Pinned scenes: the held-out evaluation set and the example images depend on these draws."""
    scene = shapes.make_scene(random.Random(7), 3)
    assert shapes.caption(scene) == "a red triangle, a yellow circle and a red square"
    assert [s.box for s in scene.shapes] == [(38, 101, 103, 166), (54, 9, 131, 86), (137, 24, 186, 73)]


def test_new_shapes_and_colours_only_when_asked():
    vocab = shapes.Vocabulary.parse("star,hexagon", "purple,orange")
    rng = random.Random(0)
    drawn = [s for _ in range(50) for s in shapes.make_scene(rng, vocab=vocab).shapes]
    assert {s.kind for s in drawn} == {"star", "hexagon"} and {s.colour for s in drawn} == {"purple", "orange"}
    assert "an orange" in " ".join(shapes.caption(shapes.Scene((0, 0, 0), [s])) for s in drawn)
    with pytest.raises(shapes.ShapesError, match="blob"):
        shapes.Vocabulary.parse("circle,blob")


def test_multi_class_and_absent_answers():
    scene = shapes.Scene(
        (250, 250, 250),
        [
            shapes.Shape("square", "red", (0, 0, 56, 56)),
            shapes.Shape("circle", "blue", (60, 0, 116, 56)),
            shapes.Shape("square", "green", (120, 0, 176, 56)),
        ],
    )
    assert shapes.detect_prompt("circle", "square") == "detect circle ; square"
    answer = shapes.detection(scene, ["circle", "square"])
    assert [part.split(">")[-1].strip() for part in answer.split(" ; ")] == ["square", "circle", "square"]
    assert shapes.detection(scene, "triangle") == ""
    prompt, suffix = shapes.ask(scene, "absent", random.Random(0))
    assert prompt == "detect triangle" and suffix == ""
    for seed in range(20):
        prompt, suffix = shapes.ask(scene, "multi", random.Random(seed))
        pair = prompt.removeprefix("detect ").split(" ; ")
        assert len(pair) == 2 and pair[0] != pair[1] and suffix == shapes.detection(scene, pair)


def test_the_dataset_cli_takes_new_shapes_and_refuses_unknown_ones(tmp_path):
    args = [sys.executable, "-m", "tools.shapes", str(tmp_path / "d"), "--images", "3"]
    ok = subprocess.run([*args, "--shapes", "circle,star", "--multi-detect", "1"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    text = (tmp_path / "d" / "data.jsonl").read_text()
    assert " star" in text and " ; " in text and len(list((tmp_path / "d" / "images").glob("*.png"))) == 3
    bad = subprocess.run([*args, "--colours", "mauve"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--colours" in bad.stderr


def _answer_with(monkeypatch, answer):
    """Make evaluate's generate reply `answer(prompt, scene)` (the scorer is tested, not a model)."""
    scenes = eval_shapes.eval_scenes(12)
    by_image = {}

    def fake_generate(model, processor, images, prompts, max_tokens):
        return [SimpleNamespace(text=answer(p, by_image[id(im)])) for im, p in zip(images, prompts)]

    real_render = shapes.Scene.render

    def render(scene, size=shapes.SIZE):
        image = real_render(scene, size)
        by_image[id(image)] = scene
        return image

    monkeypatch.setattr(shapes.Scene, "render", render)
    monkeypatch.setattr(mlx_paligemma.generation, "generate", fake_generate)
    return eval_shapes.evaluate(None, None, n_images=len(scenes))


def _truth(prompt, scene):
    if prompt == shapes.CAPTION_PROMPT:
        return shapes.caption(scene)
    if prompt == shapes.COUNT_PROMPT:
        return str(len(scene.shapes))
    if prompt.startswith("detect "):
        return shapes.detection(scene, prompt.removeprefix("detect ").split(" ; "))
    kind = prompt.removeprefix("answer en what color is the ").rstrip("?")
    return next(s.colour for s in scene.shapes if s.kind == kind)


def test_the_scorer_gives_full_marks_to_the_truth(monkeypatch):
    metrics = _answer_with(monkeypatch, _truth)
    scores = {k: v for k, v in metrics.items() if k not in ("images", "questions", "detection_miou")}
    assert all(v == 1.0 for v in scores.values()), scores
    assert metrics["detection_miou"] > 0.98  # 1024 bins of a 224-px image: sub-pixel rounding


def test_the_scorer_counts_wrong_labels_and_invented_boxes_against_the_new_measures(monkeypatch):
    def swap_labels_and_never_empty(prompt, scene):
        text = _truth(prompt, scene)
        if " ; " in prompt.removeprefix("detect "):
            return text.replace("circle", "X").replace("square", "circle").replace("X", "square")
        return text or "<loc0000><loc0000><loc0500><loc0500> circle"

    metrics = _answer_with(monkeypatch, swap_labels_and_never_empty)
    assert metrics["absent_empty"] == 0.0
    assert metrics["multi_recall50"] < 0.6  # only the triangles keep their label
    assert metrics["caption_exact"] == 1.0 and metrics["detection_recall50"] == 1.0


def test_the_caption_measures_tell_kinds_from_colours(monkeypatch):
    """A caption with every kind wrong and every colour right scores 0 on kinds and 1 on colours; one
    that names fewer shapes than there are counts the missing ones as wrong."""
    swap = {"circle": "square", "square": "triangle", "triangle": "circle"}

    def wrong_kinds(prompt, scene):
        text = _truth(prompt, scene)
        if prompt != shapes.CAPTION_PROMPT:
            return text
        return " ".join(
            swap.get(word.rstrip(","), word.rstrip(",")) + ("," if word.endswith(",") else "") for word in text.split()
        )

    metrics = _answer_with(monkeypatch, wrong_kinds)
    assert metrics["caption_kinds"] == 0.0 and metrics["caption_colours"] == 1.0
    assert metrics["caption_exact"] == 0.0

    def first_shape_only(prompt, scene):
        text = _truth(prompt, scene)
        return (
            shapes.caption(shapes.Scene(scene.background, scene.shapes[:1]))
            if prompt == shapes.CAPTION_PROMPT
            else text
        )

    metrics = _answer_with(monkeypatch, first_shape_only)
    scenes = eval_shapes.eval_scenes(12)
    expected = len(scenes) / sum(len(s.shapes) for s in scenes)  # each caption's first shape only
    assert metrics["caption_kinds"] == pytest.approx(expected) and metrics["caption_colours"] == pytest.approx(expected)
