"""Checkpoint loading: layouts, sharding, hub ids, dtypes, and every error a user can meet."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_paligemma as mp
from mlx_paligemma.checkpoint import canonical_key, open_checkpoint
from tests.helpers import noise_image


@pytest.fixture(scope="module")
def reference_logits(pg1_dir):
    model, processor = mp.load(pg1_dir)
    batch = processor(images=[noise_image(40, 40)], prompts=["caption en"])
    return batch, np.asarray(model(batch["input_ids"], batch["pixel_values"]))


def single_file_copy(src: Path, dst: Path, rename=lambda k: k, drop=(), add=None, reshape=None) -> Path:
    """Copy a checkpoint into one model.safetensors, editing its tensors on the way."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    tensors = {rename(k): v for k, v in tensors.items() if k not in drop}
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, tensors[k].dtype)
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


def test_key_layouts_map_to_one_tree():
    assert (
        canonical_key("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
        == canonical_key("vision_tower.encoder.layers.0.mlp.fc1.weight")
        == canonical_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
        == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    )
    assert (
        canonical_key("language_model.model.layers.3.self_attn.q_proj.weight")
        == canonical_key("model.language_model.layers.3.self_attn.q_proj.weight")
        == "language_model.layers.3.self_attn.q_proj.weight"
    )
    assert canonical_key("lm_head.weight") == "lm_head.weight"


def test_sharded_hub_layout_is_indexed(pg1_dir):
    index = json.loads((pg1_dir / "model.safetensors.index.json").read_text())
    ckpt = open_checkpoint(pg1_dir)
    assert len(ckpt.files) == 2 and len(ckpt.tensors) == len(index["weight_map"])
    assert any(k.startswith("vision_tower.vision_model.") for k in index["weight_map"])
    assert "lm_head.weight" not in ckpt.tensors  # tied: the head is the embedding


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_alternative_layouts_give_identical_logits(pg1_dir, tmp_path, reference_logits, prefix):
    """transformers-5 names (`vision_tower.*`, `language_model.*`) and a leading `model.`."""

    def rename(k):
        return prefix + k.replace("vision_tower.vision_model.", "vision_tower.").replace(
            "language_model.model.", "language_model."
        )

    moved = single_file_copy(pg1_dir, tmp_path / "moved", rename=rename)
    batch, expected = reference_logits
    model, _ = mp.load(moved)
    assert np.array_equal(np.asarray(model(batch["input_ids"], batch["pixel_values"])), expected)


def test_dtype_argument(pg1_dir):
    model, _ = mp.load(pg1_dir, dtype="float16")
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == mx.float16
    assert model.vision_tower.embeddings.patch_embedding.weight.dtype == mx.float16
    with pytest.raises(mp.PaliGemmaError, match="dtype: unsupported 'float64'"):
        mp.load(pg1_dir, dtype="float64")


def test_default_dtype_is_fast_on_the_device(tmp_path):
    """A bf16 checkpoint computes in float32 on the CPU (MLX's CPU bf16 kernels are scalar), in bf16 on
    the GPU; `load_model` alone and an explicit dtype keep what they are given."""
    from mlx_paligemma.load import load_model
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    d = make_tiny_checkpoint(tmp_path / "bf16", version=2, dtype="bfloat16")
    model, _ = mp.load(d)
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert model.language_model.embed_tokens.weight.dtype == (mx.float32 if on_cpu else mx.bfloat16)
    assert model.dtype == model.vision_tower.embeddings.patch_embedding.weight.dtype
    assert load_model(d).dtype == mx.bfloat16
    assert mp.load(d, dtype="bfloat16")[0].dtype == mx.bfloat16


def test_missing_tensor(pg1_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    d = single_file_copy(pg1_dir, tmp_path / "c", drop={key})
    with pytest.raises(mp.CheckpointError, match=r"missing tensor 'language_model.layers.1.mlp.down_proj.weight'"):
        mp.load(d)


def test_unexpected_tensor_names_key_and_file(pg1_dir, tmp_path):
    d = single_file_copy(pg1_dir, tmp_path / "c", add={"vision_tower.vision_model.head.probe": np.zeros(3, np.float32)})
    with pytest.raises(mp.CheckpointError, match=r"unexpected tensor 'vision_tower.head.probe' in model.safetensors"):
        mp.load(d)


def test_misshaped_tensor_names_key_file_and_shapes(pg1_dir, tmp_path):
    key = "multi_modal_projector.linear.weight"
    d = single_file_copy(pg1_dir, tmp_path / "c", reshape={key: (7, 5)})
    with pytest.raises(
        mp.CheckpointError,
        match=r"tensor 'multi_modal_projector.linear.weight' in "
        r"model.safetensors.* has shape \(7, 5\), expected \(64, 32\)",
    ):
        mp.load(d)


def test_missing_shard(pg1_dir, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(pg1_dir, d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(mp.CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        mp.load(d)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PG_PICKLE_CANARY"]),))


def test_pickle_weights_are_refused_never_unpickled(pg1_dir, tmp_path, monkeypatch):
    d = tmp_path / "c"
    shutil.copytree(pg1_dir, d, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    canary = tmp_path / "unpickled"
    monkeypatch.setenv("PG_PICKLE_CANARY", str(canary))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(
        mp.CheckpointError, match=r"only pickle weights \(pytorch_model.bin\); they are never unpickled"
    ):
        mp.load(d)
    assert not canary.exists()


def test_no_weights(tmp_path, pg1_dir):
    shutil.copy(pg1_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(mp.CheckpointError, match="no \\*.safetensors weight files"):
        mp.load(tmp_path)


def test_corrupt_safetensors(pg1_dir, tmp_path):
    d = single_file_copy(pg1_dir, tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(mp.CheckpointError, match="model.safetensors: not a readable safetensors file"):
        mp.load(d)


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(mp.CheckpointError, match="no such directory, and not a hub repo id"):
        mp.load(str(tmp_path / "nowhere" / "deeper" / "x"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(mp.CheckpointError, match="is a file"):
        mp.load(tmp_path / "file.txt")


def _hub_cache(pg_dir: Path, hf_home: Path, repo_id: str) -> None:
    """Lay a checkpoint out as huggingface_hub's cache holds a downloaded snapshot."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(pg_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _run_load(repo_id: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    code = (
        "import sys, mlx_paligemma as mp\n"
        "try:\n    m, p = mp.load(sys.argv[1]); print('loaded', p.num_image_tokens)\n"
        "except mp.PaliGemmaError as e:\n    print('error:', e)\n"
    )
    return subprocess.run([sys.executable, "-c", code, repo_id], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_loads_from_the_cache_offline(pg1_dir, tmp_path):
    """The real huggingface_hub path (snapshot_download), served from its cache with HF_HUB_OFFLINE=1."""
    _hub_cache(pg1_dir, tmp_path, "tiny-org/paligemma-test")
    out = _run_load("tiny-org/paligemma-test", tmp_path)
    assert out.stdout.strip() == "loaded 16", out.stderr


def test_hub_id_offline_and_not_cached(tmp_path):
    out = _run_load("google/paligemma-3b-pt-224", tmp_path)
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in out.stdout, out.stderr


def _http_error(cls, status):
    """The hub error as huggingface_hub raises it (the HTTP client differs across versions; fake its response)."""
    from types import SimpleNamespace

    return cls("denied", response=SimpleNamespace(status_code=status, headers={}, request=None))


@pytest.mark.parametrize(
    "error, message",
    [
        ("GatedRepoError", "this repository is gated; accept its licence .* set HF_TOKEN"),
        ("RepositoryNotFoundError", "repository not found on the Hugging Face hub .*HF_TOKEN"),
    ],
)
def test_hub_errors_say_what_to_do(monkeypatch, error, message):
    import huggingface_hub
    import huggingface_hub.errors as hub_errors

    def fake_download(*args, **kwargs):
        raise _http_error(getattr(hub_errors, error), 403 if error.startswith("Gated") else 404)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(mp.CheckpointError, match="google/paligemma-3b-pt-224: " + message):
        mp.load("google/paligemma-3b-pt-224")


def test_loading_is_lazy(tmp_path):
    """The process never holds two copies: peak memory during load stays near one copy of the weights."""
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    code = (
        "import sys, mlx.core as mx, mlx_paligemma as mp\n"
        "from mlx.utils import tree_flatten\n"
        "m, _ = mp.load(sys.argv[1])\n"
        "size = sum(v.nbytes for _, v in tree_flatten(m.parameters()))\n"
        "print(size, mx.get_peak_memory())\n"
    )
    d = make_tiny_checkpoint(tmp_path / "wide", version=1, dtype="float32")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120)
    size, peak = map(int, out.stdout.split())
    assert peak < 1.5 * size, (size, peak)
