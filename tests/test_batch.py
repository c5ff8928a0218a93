"""`mlx-paligemma batch`: rows equal the library's answers, in input order; reruns, interruptions and bad
images (two ranks against one: tests/test_sharding.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import mlx_paligemma as mp
from mlx_paligemma.batch_job import ResultsFile
from mlx_paligemma.commands import batch
from tests.helpers import noise_image
from tests.test_sharding import write_images

OPTIONS = ["--max-tokens", "6", "--quiet"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("batch") / "images", 5)


def test_rows_equal_generate_in_input_order_and_a_bad_image_is_an_error_row(pg2_dir, images, tmp_path):
    data = tmp_path / "data.jsonl"
    entries = [
        {"image": str(images / "img0.png"), "prompt": "caption en"},
        {"image": str(images / "broken.png"), "prompt": "caption en"},
        {"image": str(images / "sub" / "img2.png"), "prompt": "detect cat ; dog"},
        {"image": str(images / "missing.png")},
        {"image": str(images / "img1.png"), "prompt": "answer en what is it?"},
    ]
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = tmp_path / "out.jsonl"
    assert (
        batch.main(["--model", str(pg2_dir), "--data", str(data), "--prompt", "ocr", "--out", str(out)] + OPTIONS) == 0
    )

    rows = rows_of(out)
    assert [r["image"] for r in rows] == [e["image"] for e in entries]
    assert [r["prompt"] for r in rows] == [
        "caption en",
        "caption en",
        "detect cat ; dog",
        "ocr",
        "answer en what is it?",
    ]
    assert "not a readable image" in rows[1]["error"] and "not found" in rows[3]["error"]
    good = [0, 2, 4]
    assert all("error" not in rows[i] for i in good)
    model, processor = mp.load(pg2_dir)
    # One chunk of 8: the readable images ran as one batch, as this call runs them.
    expected = mp.generate(
        model, processor, [entries[i]["image"] for i in good], [rows[i]["prompt"] for i in good], max_tokens=6
    )
    for i, result in zip(good, expected):
        assert rows[i]["text"] == result.text and rows[i]["tokens"] == result.token_ids
        assert rows[i]["boxes"] == [d.to_dict() for d in mp.parse_detections(result.text, result.image_size)]


def test_a_rerun_does_nothing_and_an_existing_out_needs_resume(pg1_dir, images, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["--model", str(pg1_dir), "--images", str(images), "--prompt", "caption en", "--out", str(out)] + OPTIONS
    assert batch.main(args) == 0
    written = out.read_bytes()
    assert batch.main([*args, "--resume"]) == 0
    assert out.read_bytes() == written
    assert "nothing to do" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        batch.main(args)
    assert refused.value.code == 2 and "pass --resume" in capsys.readouterr().err


def test_an_interrupted_run_resumes_to_the_uninterrupted_file(pg1_dir, images, tmp_path, monkeypatch):
    args = ["--model", str(pg1_dir), "--images", str(images), "--prompt", "caption en", "--max-batch", "2"] + OPTIONS
    whole = tmp_path / "whole.jsonl"
    assert batch.main([*args, "--out", str(whole)]) == 0
    assert len(rows_of(whole)) == 6

    out = tmp_path / "out.jsonl"
    append = ResultsFile.append

    def killed_after_first_chunk(self, lines):
        append(self, lines)
        raise KeyboardInterrupt  # what Ctrl-C (or a kill between chunks) leaves

    monkeypatch.setattr(ResultsFile, "append", killed_after_first_chunk)
    assert batch.main([*args, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert len(rows_of(out)) == 2
    with open(out, "ab") as f:  # and a torn line, as a crash in the middle of a write could leave
        f.write(b'{"image": "img2.png", "pro')
    assert batch.main([*args, "--out", str(out), "--resume"]) == 0
    assert out.read_bytes() == whole.read_bytes()


def test_resume_refuses_the_output_of_another_input(pg1_dir, images, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"image": "elsewhere.png", "prompt": "caption en", "text": ""}) + "\n")
    args = ["--model", str(pg1_dir), "--images", str(images), "--prompt", "caption en", "--out", str(out), "--resume"]
    assert batch.main(args + OPTIONS) == 2
    assert "row 1 is for 'elsewhere.png'" in capsys.readouterr().err


def test_a_parquet_file_or_datasets_directory_with_an_image_column(pg1_dir, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets input needs the optional `datasets` package")
    pictures = [noise_image(48, 40, seed=s) for s in (1, 2)]
    table = datasets.Dataset.from_dict(
        {"image": pictures, "prompt": ["caption en", "answer en what?"]},
        features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    table.to_parquet(str(tmp_path / "d.parquet"))
    out = tmp_path / "out.jsonl"
    assert (
        batch.main(["--model", str(pg1_dir), "--data", str(tmp_path / "d.parquet"), "--out", str(out)] + OPTIONS) == 0
    )
    rows = rows_of(out)
    model, processor = mp.load(pg1_dir)
    expected = mp.generate(model, processor, pictures, ["caption en", "answer en what?"], max_tokens=6)
    assert [r["image"] for r in rows] == ["d.parquet[0]", "d.parquet[1]"]
    assert [r["tokens"] for r in rows] == [e.token_ids for e in expected]

    table.save_to_disk(str(tmp_path / "saved"))  # a `datasets` directory gives the same rows
    out = tmp_path / "saved.jsonl"
    assert batch.main(["--model", str(pg1_dir), "--data", str(tmp_path / "saved"), "--out", str(out)] + OPTIONS) == 0
    assert [{**r, "image": None} for r in rows_of(out)] == [{**r, "image": None} for r in rows]


def test_a_dataset_without_the_datasets_package_is_one_clear_error(pg1_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    args = ["--model", str(pg1_dir), "--data", str(tmp_path / "d.parquet"), "--prompt", "ocr"]
    assert batch.main([*args, "--out", str(tmp_path / "o.jsonl")] + OPTIONS) == 2
    assert "needs the `datasets` package" in capsys.readouterr().err
