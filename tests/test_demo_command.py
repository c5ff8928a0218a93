"""`mlx-paligemma demo`: every answer about the packaged example images is right (judged against the
scenes the images were drawn from, tools/train_demo_model.example_scenes), the PNG is written, and an
existing file is never overwritten without --force."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.eval_shapes import iou
from mlx_paligemma.commands import demo
from tools import shapes
from tools import train_demo_model as trainer

# The answers the model shipped before the retrain gets wrong (measured at this commit). The retrain of
# issue 19 must make them right; strict xfail turns each into a failure the day it starts passing, so
# the list is then emptied.
WRONG_BEFORE_RETRAIN = {
    ("shapes1.png", "caption en"),
    ("shapes1.png", "answer en how many shapes are there?"),
    ("shapes1.png", "answer en what color is the triangle?"),
    ("shapes1.png", "detect triangle"),
    ("shapes1.png", "detect circle ; square"),
    ("shapes2.png", "caption en"),
    ("shapes2.png", "answer en how many shapes are there?"),
    ("shapes2.png", "detect circle"),
    ("shapes2.png", "detect circle ; triangle"),
    ("shapes2.png", "detect square"),
    ("shapes3.png", "detect triangle ; circle"),
    ("shapes3.png", "detect circle"),
}


def ground_truth() -> list[tuple[str, str, object]]:
    """(image, prompt, expected) from the scenes' generation parameters: text, or (label, box) pairs."""
    out = []
    for i, scene in enumerate(trainer.example_scenes(), start=1):
        for prompt in trainer.example_questions(scene):
            if prompt.startswith("detect "):
                kinds = prompt.removeprefix("detect ").split(" ; ")
                expected = [(s.kind, s.box) for s in scene.shapes if s.kind in kinds]
            elif prompt == shapes.CAPTION_PROMPT:
                expected = shapes.caption(scene)
            elif prompt == shapes.COUNT_PROMPT:
                expected = str(len(scene.shapes))
            else:
                kind = prompt.removeprefix("answer en what color is the ").rstrip("?")
                expected = next(s.colour for s in scene.shapes if s.kind == kind)
            out.append((f"shapes{i}.png", prompt, expected))
    return out


def is_right(expected, row: dict) -> bool:
    """Text: equal. Detection: one box per true object, its label, IoU >= 0.5, nothing else."""
    if isinstance(expected, str):
        return row["answer"] == expected
    found = [(b["label"], b["box"]) for b in row["boxes"]]
    if sorted(label for label, _ in found) != sorted(kind for kind, _ in expected):
        return False
    if not found:
        return row["answer"] == ""
    unmatched = list(found)
    for kind, box in expected:
        best = max((f for f in unmatched if f[0] == kind), key=lambda f: iou(box, f[1]), default=None)
        if best is None or iou(box, best[1]) < 0.5:
            return False
        unmatched.remove(best)
    return True


def test_the_judge_accepts_the_truth_and_nothing_else():
    from mlx_paligemma.tasks import parse_detections

    size = (shapes.SIZE, shapes.SIZE)
    scene = trainer.example_scenes()[0]
    for prompt in [q for q in trainer.example_questions(scene) if q.startswith("detect ")]:
        kinds = prompt.removeprefix("detect ").split(" ; ")
        text = shapes.detection(scene, kinds)
        expected = [(s.kind, s.box) for s in scene.shapes if s.kind in kinds]
        row = {"answer": text, "boxes": [d.to_dict() for d in parse_detections(text, size)]}
        assert is_right(expected, row)
        shifted = text.replace("<loc0", "<loc1", 1)  # first y0 moved down by ~50 px
        wrong = {"answer": shifted, "boxes": [d.to_dict() for d in parse_detections(shifted, size)]}
        assert not is_right(expected, wrong)
        assert not is_right(expected, {"answer": "", "boxes": []})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.png"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_paligemma", "demo", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return out, {(r["image"], r["prompt"]): r for r in json.loads(run.stdout)}


def test_the_packaged_examples_are_the_scenes_and_questions_of_the_generator(tmp_path):
    written = trainer.write_examples(tmp_path)
    for path, _scene in written:
        packaged = np.asarray(Image.open(demo.EXAMPLES_DIR / path.name))
        assert np.array_equal(packaged, np.asarray(Image.open(path))), path.name
    assert json.loads((tmp_path / trainer.PROMPTS_FILE).read_text()) == demo.example_plan()


def test_the_demo_asks_every_question_and_writes_the_png(demo_run):
    out, rows = demo_run
    assert set(rows) == {(image, prompt) for image, prompt, _ in ground_truth()}
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (3 * shapes.SIZE + 2 * demo.GAP, shapes.SIZE)


def test_an_existing_out_is_kept_without_force(demo_run):
    out, _ = demo_run
    before = out.read_bytes()
    run = subprocess.run(
        [sys.executable, "-m", "mlx_paligemma", "demo", "--out", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        f"mlx-paligemma demo: error: --out: {out} exists; pass --force to overwrite it"
    ]
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "image, prompt, expected",
    [
        pytest.param(
            *case,
            id=f"{case[0]}: {case[1]}",
            marks=[pytest.mark.xfail(strict=True, reason="retrain pending (issue 19)")]
            if case[:2] in WRONG_BEFORE_RETRAIN
            else [],
        )
        for case in ground_truth()
    ],
)
def test_every_answer_is_right(demo_run, image, prompt, expected):
    _, rows = demo_run
    assert is_right(expected, rows[(image, prompt)]), (expected, rows[(image, prompt)]["answer"])


def test_every_demo_file_is_package_data():
    """The wheel carries the demo (pyproject's package-data patterns cover every file of demo/); checked
    by building a wheel, `pip wheel --no-deps . -w DIR`, when the patterns were written."""
    import re

    root = Path(demo.__file__).resolve().parents[2]
    text = (root / "pyproject.toml").read_text()
    line = re.search(r"^mlx_paligemma = \[(.*)\]$", text.split("[tool.setuptools.package-data]", 1)[1], re.M)
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    package = root / "mlx_paligemma"
    files = {p for p in (package / "demo").rglob("*") if p.is_file()}
    shipped = {p for pattern in patterns for p in package.glob(pattern)}  # setuptools' glob semantics
    assert files and files <= shipped, sorted(str(p) for p in files - shipped)


def test_the_pytorch_backend_gives_the_same_answers(demo_run):
    """What `--backend torch` runs (in process: torch is imported once per test session)."""
    from mlx_paligemma.reference import load as load_torch

    _, rows = demo_run
    torch_rows = demo.run_demo(*load_torch(demo.DEMO_DIR, device="cpu", dtype="float32"))
    assert {(r["image"], r["prompt"]): r["answer"] for r in torch_rows} == {k: r["answer"] for k, r in rows.items()}
