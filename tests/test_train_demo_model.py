"""The demo trainer (tools/train_demo_model.py) at toy scale: fresh scenes every step from a seed, parts
that resume exactly where they stopped, a learning curve, and a 16-bit shipped model that loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma.config import load_config
from mlx_paligemma.processor import Processor
from tools import shapes
from tools import train_demo_model as trainer
from tools.demo_stream import SceneStream, parse_mix

TOY = trainer.Arch(
    image_size=32,
    patch_size=16,
    vision_width=32,
    vision_layers=1,
    vision_mlp=64,
    vision_heads=2,
    text_width=32,
    text_layers=1,
    text_mlp=64,
    text_heads=2,
    head_dim=16,
)
# one padded length (one compiled step), one scene per learning-curve point: seconds, not minutes
FLAGS = ["--batch-size", "4", "--warmup", "2", "--eval-images", "1", "--quiet", "--lr", "3e-3", "--pad-multiple", "96"]


@pytest.fixture(scope="module")
def toy_init(tmp_path_factory) -> Path:
    return trainer.build_init(tmp_path_factory.mktemp("toy") / "init", TOY)


def _work(tmp_path: Path, toy_init: Path, name: str) -> Path:
    work = tmp_path / name
    shutil.copytree(toy_init, work / "init")
    return work


def test_the_stream_is_a_function_of_seed_and_step(toy_init):
    processor = Processor.from_dir(toy_init, load_config(toy_init))
    stream = SceneStream(processor, batch_size=4, seed=3, pool=2)
    a, b = stream.chunk(5, 0.5), stream.chunk(5, 0.5)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not np.array_equal(a[0]["pixel_values"], stream.chunk(6, 0.5)[0]["pixel_values"])
    only_absent = SceneStream(processor, 4, mix=parse_mix("absent=1,caption=1e-9"), absent_from=0.5, pool=2)
    before, after = only_absent.chunk(0, 0.2), only_absent.chunk(0, 0.8)
    suffix_tokens = lambda batches: [int(b["token_type_ids"].sum()) for b in batches]
    assert min(suffix_tokens(before)) > 4 and suffix_tokens(after) == [4, 4]  # captions, then only eos


def test_a_run_in_two_parts_equals_one_run(tmp_path, toy_init):
    one, two = _work(tmp_path, toy_init, "one"), _work(tmp_path, toy_init, "two")
    assert trainer.main([str(one), "--steps", "6", *FLAGS]) == 0
    assert trainer.main([str(two), "--steps", "6", "--stop-after-steps", "3", *FLAGS]) == 0
    assert trainer.latest_snapshot(two).name == "step-0000003"
    assert trainer.main([str(two), "--steps", "6", *FLAGS]) == 2  # refuses to start over a run
    assert trainer.main([str(two), "--resume", "--quiet", "--eval-images", "1"]) == 0
    a = mx.load(str(trainer.latest_snapshot(one) / "model.safetensors"))
    b = mx.load(str(trainer.latest_snapshot(two) / "model.safetensors"))
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    curve = [json.loads(line) for line in (two / "log.txt").read_text().splitlines()]
    assert [r["step"] for r in curve] == [3, 6] and curve[-1]["examples"] == 24
    keys = {"loss", "caption_exact", "counting", "colour", "detection_miou", "absent_empty", "multi_recall50"}
    assert keys <= curve[-1].keys()
    state = json.loads((trainer.latest_snapshot(one) / trainer.STATE).read_text())
    assert state["step"] == 6 and state["options"]["batch_size"] == 4


def test_the_vision_tower_can_learn_at_its_own_rate(tmp_path, toy_init):
    """--vision-lr-scale 4: AdamW's first step moves every weight by about the rate (the update is
    m / sqrt(v) = sign(g)), so the vision tower's weights move 4x as far and the decoder's as far as at
    scale 1; the run resumes from the two optimisers' saved state."""
    init = mx.load(str(toy_init / "model.safetensors"))
    moved = {}
    for scale in ("1", "4"):
        work = _work(tmp_path, toy_init, f"scale{scale}")
        flags = ["--steps", "4", "--stop-after-steps", "1", "--vision-lr-scale", scale, *FLAGS]
        assert trainer.main([str(work), *flags]) == 0
        after = mx.load(str(trainer.latest_snapshot(work) / "model.safetensors"))

        def largest_move(prefix: str, after: dict = after) -> float:
            return max(float(mx.abs(after[k] - init[k]).max()) for k in init if k.startswith(prefix))

        moved[scale] = (largest_move("vision_tower."), largest_move("language_model.layers."))
        if scale == "4":
            assert trainer.main([str(work), "--resume", "--quiet", "--eval-images", "1"]) == 0
            assert trainer.latest_snapshot(work).name == "step-0000004"
    assert moved["4"][0] == pytest.approx(4 * moved["1"][0], rel=0.02)
    assert moved["4"][1] == pytest.approx(moved["1"][1], rel=0.02)


def test_the_shipped_file_is_16_bit_and_loads_as_float32(tmp_path, toy_init):
    work = _work(tmp_path, toy_init, "run")
    assert trainer.main([str(work), "--steps", "2", *FLAGS]) == 0
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "README.md").write_text("# notes kept\n")
    for _ in range(2):  # the generated part is replaced, the hand-written part kept
        results = trainer.ship(work, dest, dtype="float16", eval_images=2)
    assert set(results) == {"MLX float32", "PyTorch float32", "MLX 8-bit"}
    readme = (dest / "README.md").read_text()
    assert readme.startswith("# notes kept") and readme.count(trainer.GENERATED_START) == 1
    assert "Stored as float16" in readme
    stored = mx.load(str(dest / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {mx.float16}
    float32 = mx.load(str(trainer.latest_snapshot(work) / "model.safetensors"))
    assert (dest / "model.safetensors").stat().st_size < 0.6 * (
        trainer.latest_snapshot(work) / "model.safetensors"
    ).stat().st_size
    model, _ = mp.load(dest)
    assert model.language_model.norm.weight.dtype == mx.float32  # computed in float32 on the CPU
    key = "language_model.norm.weight"
    assert np.allclose(np.asarray(model.language_model.norm.weight), np.asarray(float32[key]), atol=1e-3)
    plan = json.loads((dest / "examples" / trainer.PROMPTS_FILE).read_text())
    assert [p["image"] for p in plan] == ["shapes1.png", "shapes2.png", "shapes3.png"]
    assert (dest / "forward_check.json").is_file()


def test_example_questions_cover_every_kind_of_prompt():
    asked = [q for scene in trainer.example_scenes() for q in trainer.example_questions(scene)]
    assert shapes.CAPTION_PROMPT in asked and shapes.COUNT_PROMPT in asked
    assert any(q.startswith("answer en what color") for q in asked)
    assert any(q.startswith("detect ") and " ; " in q for q in asked)
    assert any(q.startswith("detect ") and " ; " not in q for q in asked)


def test_every_option_is_documented_in_the_demo_readme():
    readme = (Path(mp.__file__).parent / "demo" / "README.md").read_text()
    flags = [a.option_strings[-1] for a in trainer.build_parser()._actions if a.option_strings]
    missing = [f for f in flags if f != "--help" and f"`{f}" not in readme]
    assert not missing, missing
