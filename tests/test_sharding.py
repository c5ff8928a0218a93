"""Tensor parallelism (`mp.load(shard=True)` under `mlx.launch`) and `batch` across ranks: two processes on
this machine (ring backend over loopback) against one.

One launch runs every two-rank check (tests/two_rank_checks.py); the single-process side is computed
here, by the unsharded code path. Measured: the sharded logits differ from one process's by at most
7e-6 (float32; summation order of the split matmuls), tolerance 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_paligemma as mp
from mlx_paligemma.commands import batch
from mlx_paligemma.config import load_config
from mlx_paligemma.memory import weight_bytes
from mlx_paligemma.quantize import quantize
from mlx_paligemma.sharding import _sharded_to_all, check_shardable
from tests import two_rank_checks
from tests.helpers import noise_image

LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))


def test_a_rank_count_that_does_not_divide_the_heads_is_refused(pg1_dir, pg2_dir):
    with pytest.raises(mp.PaliGemmaError, match=r"4 attention heads over 3 ranks"):
        check_shardable(load_config(pg1_dir), 3)
    config = load_config(pg2_dir)
    text = dataclasses.replace(config.text_config, num_attention_heads=12, num_key_value_heads=4)
    with pytest.raises(mp.PaliGemmaError, match=r"4 KV heads over 6 ranks"):
        check_shardable(dataclasses.replace(config, text_config=text), 6)
    check_shardable(config, 4)  # 2 KV heads, 4 ranks: each rank keeps the KV head its queries read
    vision = dataclasses.replace(config.vision_config, num_attention_heads=6)
    check_shardable(dataclasses.replace(config, vision_config=vision), 4)  # the vision tower stays whole
    with pytest.raises(mp.PaliGemmaError, match=r"vision tower's 6 attention heads over 4 ranks"):
        check_shardable(dataclasses.replace(config, vision_config=vision), 4, shard_vision=True)


def write_images(folder: Path, n: int) -> Path:
    """n small images of several sizes in a tree, and one file that is not an image."""
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        noise_image(40 + 9 * i, 56 - 3 * i, seed=10 + i).save(folder / ("sub" if i % 3 == 2 else ".") / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


@pytest.fixture(scope="module")
def quantized(pg1_dir, pg2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("q4")
    quiet = lambda message: None  # noqa: E731
    return {
        name: quantize(src, root / name, bits=4, group_size=32, progress=quiet)
        for name, src in (("pg1", pg1_dir), ("pg2", pg2_dir))
    }


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_two_ranks_give_one_process_results(pg1_dir, pg2_dir, quantized, tmp_path):
    models = {
        "pg1": str(pg1_dir),
        "pg2": str(pg2_dir),
        "pg1-q4": str(quantized["pg1"]),
        "pg2-q4": str(quantized["pg2"]),
    }
    image_dir = write_images(tmp_path / "images", 5)
    spec = {
        "out": str(tmp_path),
        "models": models,
        "image_dir": str(image_dir),
        "batch_out": str(tmp_path / "two.jsonl"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    launched = subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, "-m", "tests.two_rank_checks"]
        + [str(tmp_path / "spec.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr

    for name, model_dir in models.items():
        model, processor = mp.load(model_dir)
        one = two_rank_checks.model_outputs(model, processor)
        whole = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        for rank in (0, 1):
            logits = np.load(tmp_path / f"rank{rank}-{name}-logits.npy")
            assert logits.shape == one["logits"].shape
            np.testing.assert_allclose(logits, one["logits"], rtol=0, atol=1e-4, err_msg=f"{name} rank {rank}")
            two = json.loads((tmp_path / f"rank{rank}-{name}.json").read_text())
            assert two["tokens"] == one["tokens"], (name, rank)
            assert two["sampled"] == one["sampled"], (name, rank)  # rank 0's draw, on both ranks
            share = two["lm_bytes"] / one["lm_bytes"]
            if not name.endswith("-q4") and name not in two_rank_checks.VISION_SHARDED:
                # the --shard --dry-run estimate of one rank's weights: what the rank holds (vision whole)
                estimate, _ = weight_bytes(model.config, mx.float32, tp_ranks=2)
                held = two["lm_bytes"] + whole - one["lm_bytes"]
                assert abs(estimate / held - 1) < 0.02, (name, rank, estimate, held)
            # Half, plus what every rank keeps whole: norms, and PaliGemma 1's single KV head.
            assert 0.45 < share < 0.6, (name, rank, share)
            # Loading never holds the whole model: each tensor is read, cut and freed in turn (measured 0.63-0.89
            # of the whole here, where the replicated vision tower weighs more than in a real model).
            assert two["load_peak"] < 0.95 * whole, (name, rank, two["load_peak"] / whole)

    cli = [json.loads((tmp_path / f"rank{rank}-cli.json").read_text()) for rank in (0, 1)]
    assert [c["status"] for c in cli] == [0, 0]
    model, processor = mp.load(pg2_dir)
    expected = mp.generate(model, processor, two_rank_checks.images()[0], two_rank_checks.PROMPTS[0], max_tokens=12)
    assert cli[0]["stdout"] == expected.text + "\n"
    assert cli[1]["stdout"] == ""  # only rank 0 prints

    assert [json.loads((tmp_path / f"rank{rank}-batch.json").read_text())["status"] for rank in (0, 1)] == [[0, 0]] * 2
    one_rank = tmp_path / "one.jsonl"
    args = ["--model", str(pg1_dir), "--images", str(image_dir), "--prompt", two_rank_checks.PROMPTS[0]]
    assert batch.main([*args, "--out", str(one_rank), "--max-batch", "2", "--max-tokens", "6", "--quiet"]) == 0
    rows = (tmp_path / "two.jsonl").read_text()
    assert rows == one_rank.read_text()
    assert (tmp_path / "two.jsonl.sharded").read_text() == rows  # the model split instead of the images
    assert len(rows.splitlines()) == 6 and '"error"' in rows


def test_a_quantized_layer_splits_only_into_whole_groups():
    class FourRanks:  # only the size matters before any collective is made
        def size(self) -> int:
            return 4

    layer = nn.QuantizedLinear(128, 64, bias=False, group_size=64, bits=4)
    with pytest.raises(mp.PaliGemmaError, match=r"128-wide quantized layer over 4 ranks: each rank's 32 columns"):
        _sharded_to_all(layer, FourRanks())
