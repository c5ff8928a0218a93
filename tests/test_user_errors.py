"""What a new user meets: every mistake is one line on stderr and exit status 2, in the CLI's words.

The CLIs run in-process here (`main(argv)`, as the `mlx-paligemma` command calls them) except
where a missing torch is simulated, which needs a fresh interpreter (tests.helpers.run_without_torch).
"""

from __future__ import annotations

import importlib
import os
import shutil
import stat
from pathlib import Path

import pytest

import mlx_paligemma as mp
from tests.helpers import noise_image, png_claiming_size

ROOT = Path(__file__).resolve().parents[1]
# The CLI modules (`mlx_paligemma.quantize` is also the name of a function of that module).
generate_cli = importlib.import_module("mlx_paligemma.commands.generate")
quantize_cli = importlib.import_module("mlx_paligemma.quantize")


def run(main, *args: str, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """Exit 2, no traceback, one error line (after any progress lines) holding `fragment`."""
    assert code == 2, err
    errors = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert fragment in errors[0] and err.strip().endswith(errors[0]), err


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    noise_image(60, 40, seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def truncated_dir(pg1_dir, tmp_path_factory) -> Path:
    """pg1 with its second shard cut to half its size: an interrupted download."""
    d = tmp_path_factory.mktemp("truncated") / "pg1"
    shutil.copytree(pg1_dir, d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return d


def test_a_truncated_safetensors_file_is_named_by_every_loader(truncated_dir):
    from mlx_paligemma import reference

    match = r"model-00002-of-00002.safetensors: incomplete or corrupt \(\d+ of \d+ bytes\); download it again"
    with pytest.raises(mp.CheckpointError, match=match):
        mp.load(truncated_dir)
    with pytest.raises(mp.CheckpointError, match=match):
        reference.load(truncated_dir, device="cpu")


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_truncated_checkpoint_is_one_line_from_generate(truncated_dir, image_path, backend, capsys):
    code, _, err = run(
        generate_cli.main,
        *("--model", truncated_dir, "--image", image_path, "--prompt", "caption en", "--backend", backend),
        capsys=capsys,
    )
    assert_one_line_error(code, err, "incomplete or corrupt")


def test_a_truncated_checkpoint_is_one_line_from_quantize(truncated_dir, tmp_path, capsys):
    code, _, err = run(
        quantize_cli.main, "--model", truncated_dir, "--out", tmp_path / "q", "--bits", "4", capsys=capsys
    )
    assert_one_line_error(code, err, "incomplete or corrupt")
    assert not (tmp_path / "q").exists()


def test_a_quantized_checkpoint_on_the_torch_backend_says_why(pg1_dir, image_path, tmp_path, capsys):
    quantized = quantize_cli.quantize(pg1_dir, tmp_path / "q8", bits=8, group_size=32, progress=lambda _: None)
    code, _, err = run(
        generate_cli.main,
        *("--model", quantized, "--image", image_path, "--prompt", "caption en", "--backend", "torch"),
        capsys=capsys,
    )
    assert_one_line_error(code, err, "8-bit quantized MLX checkpoint; the PyTorch reference reads float checkpoints")


def test_a_directory_as_image_says_it_is_a_directory(pg1_dir, tmp_path, capsys):
    code, _, err = run(
        generate_cli.main, "--model", pg1_dir, "--image", tmp_path, "--prompt", "caption en", capsys=capsys
    )
    assert_one_line_error(code, err, f"--image: {tmp_path}: is a directory, not an image file")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-tokens", "0", "--max-tokens: must be at least 1, got 0"),
        ("--temperature", "-1", "--temperature: must be >= 0"),
        ("--top-p", "0", "--top-p: must be in (0, 1]"),
        ("--top-k", "-2", "--top-k: must be >= 0"),
        ("--repetition-penalty", "0", "--repetition-penalty: must be > 0"),
        ("--max-image-pixels", "0", "--max-image-pixels: must be at least 1"),
    ],
)
def test_option_errors_name_the_flag(pg1_dir, image_path, flag, value, message, capsys):
    code, _, err = run(
        generate_cli.main,
        *("--model", pg1_dir, "--image", image_path, "--prompt", "caption en", flag, value),
        capsys=capsys,
    )
    assert_one_line_error(code, err, message)


def test_an_image_over_the_pixel_limit_is_one_line_and_the_limit_a_flag(pg1_dir, tmp_path, capsys):
    bomb = png_claiming_size(tmp_path / "bomb.png", 20000, 20000)
    args = ("--model", pg1_dir, "--image", bomb, "--prompt", "caption en")
    code, _, err = run(generate_cli.main, *args, capsys=capsys)
    assert_one_line_error(
        code,
        err,
        "bomb.png: 20000x20000 is 400 megapixels, over the limit of 100 megapixels; raise the limit "
        "(--max-image-pixels)",
    )
    code, _, err = run(generate_cli.main, *args, "--max-image-pixels", "500000000", capsys=capsys)
    assert_one_line_error(code, err, "bomb.png: not a readable image")  # past the limit, on to decoding


def test_a_prompt_past_the_models_positions_is_refused_naming_both_numbers(pg1_dir, image_path, capsys):
    prompt = "answer en " + "why is the sky so very blue today " * 1200
    code, _, err = run(generate_cli.main, "--model", pg1_dir, "--image", image_path, "--prompt", prompt, capsys=capsys)
    assert_one_line_error(code, err, "tokens (image tokens included), more than the model's limit of 8192")


def test_a_long_prefill_is_announced_on_stderr(pg1_dir, image_path, capsys, monkeypatch):
    monkeypatch.setattr(generate_cli, "LONG_PREFILL_TOKENS", 30)  # (2048 by default) the image alone is 16
    prompt = "answer en why is the sky so very blue"
    code, out, err = run(
        generate_cli.main,
        *("--model", pg1_dir, "--image", image_path, "--prompt", prompt, "--max-tokens", "1"),
        capsys=capsys,
    )
    assert code == 0, err
    assert "reading a long prompt (" in err and out.endswith("\n")


def test_draw_writes_with_the_users_umask(pg1_dir, image_path, tmp_path, capsys):
    """The PNG was once written 0600, as its temporary file was made."""
    old = os.umask(0o022)
    try:
        code, _, err = run(
            generate_cli.main,
            *("--model", pg1_dir, "--image", image_path, "--prompt", "detect cat", "--max-tokens", "2"),
            *("--draw", tmp_path / "boxes.png"),
            capsys=capsys,
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "boxes.png").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.png"]
