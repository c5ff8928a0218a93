"""`python -m mlx_paligemma.generate` in a subprocess, as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import noise_image


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_paligemma.generate", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    noise_image(120, 80, seed=9).save(path)
    return path


def test_plain_run_streams_the_answer(pg1_dir, image_path):
    import mlx_paligemma as mp

    out = run_cli(
        "--model", str(pg1_dir), "--image", str(image_path), "--prompt", "caption en", "--max-tokens", "12", "--verbose"
    )
    assert out.returncode == 0, out.stderr
    model, processor = mp.load(pg1_dir)
    expected = mp.generate(model, processor, image_path, "caption en", max_tokens=12).text
    assert out.stdout == expected + "\n"
    assert "tokens/s" in out.stderr and "peak memory" in out.stderr


def test_json_output(pg1_dir, image_path):
    out = run_cli(
        "--model", str(pg1_dir), "--image", str(image_path), "--prompt", "detect cat", "--max-tokens", "8", "--json"
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"text", "tokens", "boxes", "stats", "finish_reason"}
    assert len(data["tokens"]) <= 8 and data["stats"]["prompt_tokens"] > 16


def test_batch_of_two_pairs(pg2_dir, image_path):
    out = run_cli(
        "--model",
        str(pg2_dir),
        "--image",
        str(image_path),
        "--prompt",
        "caption en",
        "--image",
        str(image_path),
        "--prompt",
        "answer en what?",
        "--max-tokens",
        "6",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert [r["prompt"] for r in json.loads(out.stdout)["results"]] == ["caption en", "answer en what?"]


def test_torch_backend_gives_the_same_answer(pg1_dir, image_path):
    args = (
        "--model",
        str(pg1_dir),
        "--image",
        str(image_path),
        "--prompt",
        "caption en",
        "--max-tokens",
        "10",
        "--json",
    )
    mlx_out, torch_out = run_cli(*args), run_cli(*args, "--backend", "torch", "--device", "cpu")
    assert torch_out.returncode == 0, torch_out.stderr
    assert json.loads(torch_out.stdout)["tokens"] == json.loads(mlx_out.stdout)["tokens"]


def test_draw_writes_png_of_original_size(pg1_dir, image_path, tmp_path):
    out_png = tmp_path / "boxes.png"
    out = run_cli(
        "--model",
        str(pg1_dir),
        "--image",
        str(image_path),
        "--prompt",
        "detect cat",
        "--max-tokens",
        "4",
        "--draw",
        str(out_png),
    )
    assert out.returncode == 0, out.stderr
    with Image.open(out_png) as drawn:
        assert drawn.format == "PNG" and drawn.size == (120, 80)
    again = run_cli(
        "--model",
        str(pg1_dir),
        "--image",
        str(image_path),
        "--prompt",
        "detect cat",
        "--max-tokens",
        "4",
        "--draw",
        str(out_png),
    )
    assert again.returncode == 2 and "exists; pass --force" in again.stderr


def _assert_user_error(out: subprocess.CompletedProcess, fragment: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], out.stderr


def test_user_errors_exit_2_with_one_line(pg1_dir, image_path, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    base = ["--prompt", "caption en"]
    _assert_user_error(
        run_cli("--model", str(pg1_dir), "--image", str(tmp_path / "nope.jpg"), *base), "nope.jpg: no such file"
    )
    _assert_user_error(
        run_cli("--model", str(pg1_dir), "--image", str(not_image), *base), "notes.png: not a readable image"
    )
    _assert_user_error(
        run_cli("--model", str(tmp_path / "no-model"), "--image", str(image_path), *base),
        "no such directory, and not a hub repo id",
    )
    _assert_user_error(
        run_cli("--model", str(pg1_dir), "--image", str(image_path), *base, "--dtype", "int3"),
        "argument --dtype: invalid choice",
    )
    _assert_user_error(
        run_cli("--model", str(pg1_dir), "--image", str(image_path), *base, "--backend", "jax"),
        "argument --backend: invalid choice",
    )
    _assert_user_error(
        run_cli("--model", str(pg1_dir), "--image", str(image_path), *base, "--top-p", "0"), "--top-p: must be in"
    )
    _assert_user_error(
        run_cli("--model", str(pg1_dir), "--image", str(image_path), *base, "--max-tokens", "x"),
        "argument --max-tokens: invalid int value",
    )
