"""The segmentation mask decoder: MLX vs the PyTorch reference, file formats, strict loading, conversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma.mask_decoder import convert, expected_shapes, load_decoder_tensors
from tools.make_random_mask_decoder import make_random_mask_decoder, random_decoder_weights

CODEBOOK_DIM = 512


@pytest.fixture(scope="module")
def decoder_npz(tmp_path_factory) -> Path:
    return make_random_mask_decoder(tmp_path_factory.mktemp("dec") / "vae-oid.npz", CODEBOOK_DIM, seed=3)


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    rng = np.random.default_rng(7)
    batch = rng.integers(0, 128, (24, 16))
    batch[0] = 0
    batch[1] = 127
    return batch


def _functional_reference(npz: Path, codes: np.ndarray) -> np.ndarray:
    """The decoder written out with torch.nn.functional from the npz, independent of our module tree."""
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(v) for k, v in np.load(npz).items()}
    x = w["_vq_vae._embedding"][torch.from_numpy(codes).long()]  # (B, 16, D)
    x = x.reshape(len(codes), 4, 4, -1).permute(0, 3, 1, 2)  # row-major 4x4 grid, NCHW
    x = F.relu(F.conv2d(x, w["decoder.0.weight"], w["decoder.0.bias"]))
    for block in (2, 3):
        p = f"decoder.{block}.net"
        h = F.relu(F.conv2d(x, w[f"{p}.0.weight"], w[f"{p}.0.bias"], padding=1))
        h = F.relu(F.conv2d(h, w[f"{p}.2.weight"], w[f"{p}.2.bias"], padding=1))
        x = x + F.conv2d(h, w[f"{p}.4.weight"], w[f"{p}.4.bias"])
    for i in (4, 6, 8, 10):
        x = F.relu(F.conv_transpose2d(x, w[f"decoder.{i}.weight"], w[f"decoder.{i}.bias"], stride=2, padding=1))
    return F.conv2d(x, w["decoder.12.weight"], w["decoder.12.bias"])[:, 0].numpy()


def test_mlx_decoder_matches_the_pytorch_reference(decoder_npz, codes):
    mlx_out = mp.load_mask_decoder(decoder_npz).decode(codes)
    torch_out = mp.load_mask_decoder(decoder_npz, backend="torch", device="cpu").decode(codes)
    assert mlx_out.shape == (24, 64, 64) and mlx_out.dtype == np.float32
    assert np.abs(mlx_out - torch_out).max() <= 1e-5  # measured 2.5e-6 with outputs in about [-2, 1]
    assert (mlx_out > 0).mean() > 0.05 and (mlx_out < 0).mean() > 0.05  # a mask with both signs, not a constant


def test_reference_decoder_matches_a_functional_rewrite(decoder_npz, codes):
    torch_out = mp.load_mask_decoder(decoder_npz, backend="torch", device="cpu").decode(codes)
    assert np.abs(torch_out - _functional_reference(decoder_npz, codes)).max() <= 1e-6


def test_call_takes_backend_arrays_and_batches_are_independent(decoder_npz, codes):
    import mlx.core as mx
    import torch

    dec = mp.load_mask_decoder(decoder_npz)
    out = dec(mx.array(codes[:3].astype(np.int32)))
    assert isinstance(out, mx.array) and out.shape == (3, 64, 64) and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out[1]), dec.decode(codes[1:2])[0], atol=1e-5)
    np.testing.assert_allclose(np.array(dec(codes[:3])), np.array(out))  # numpy codes are accepted too
    ref = mp.load_mask_decoder(decoder_npz, backend="torch", device="cpu")
    assert ref(torch.from_numpy(codes[:3]).long()).shape == (3, 64, 64)
    np.testing.assert_allclose(ref(codes[:3]).numpy(), np.array(out), atol=1e-5)


def test_codes_are_checked_before_decoding(decoder_npz):
    dec = mp.load_mask_decoder(decoder_npz)
    assert dec.decode(np.zeros((0, 16), np.int64)).shape == (0, 64, 64)
    assert dec.decode(list(range(16))).shape == (1, 64, 64)  # one object may be given flat
    with pytest.raises(mp.PaliGemmaError, match=r"codes must be in 0\.\.127, got 0\.\.128"):
        dec.decode([[128] + [0] * 15])
    with pytest.raises(mp.PaliGemmaError, match=r"shape \(B, 16\), got \(2, 15\)"):
        dec.decode(np.zeros((2, 15), np.int64))


def test_npz_safetensors_and_directory_load_the_same_decoder(decoder_npz, codes, tmp_path):
    st = convert(decoder_npz, tmp_path / "vae-oid.safetensors")
    codes = codes[:6]
    expected = mp.load_mask_decoder(decoder_npz).decode(codes)
    assert np.array_equal(mp.load_mask_decoder(st).decode(codes), expected)
    assert np.array_equal(mp.load_mask_decoder(tmp_path).decode(codes), expected)  # the folder holding it
    from_torch = mp.load_mask_decoder(st, backend="torch", device="cpu").decode(codes[:4])
    np.testing.assert_allclose(from_torch, expected[:4], atol=1e-5)


def test_hub_repo_id_downloads_only_decoder_files(decoder_npz, codes, monkeypatch, tmp_path):
    import shutil

    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(decoder_npz, snapshot / "vae-oid.npz")
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    dec = mp.load_mask_decoder("some-org/paligemma-mask-decoder")
    assert calls == [("some-org/paligemma-mask-decoder", ["*.npz", "*.safetensors", "*.md", "*.json"])]
    assert np.array_equal(dec.decode(codes[:2]), mp.load_mask_decoder(decoder_npz).decode(codes[:2]))


def _save(path: Path, weights: dict) -> Path:
    np.savez(path, **weights)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("decoder.6.bias"), r"missing tensor 'decoder\.6\.bias' \(shape \(64,\)\)"),
        (
            lambda w: w.update({"decoder.99.weight": np.zeros(3, np.float32)}),
            r"unexpected tensor 'decoder\.99\.weight'",
        ),
        (
            lambda w: w.update({"decoder.8.weight": np.zeros((64, 32, 3, 3), np.float32)}),
            r"tensor 'decoder\.8\.weight' has shape \(64, 32, 3, 3\), expected \(64, 32, 4, 4\)",
        ),
        (  # a codebook whose width disagrees with the first conv
            lambda w: w.update({"_vq_vae._embedding": np.zeros((128, 64), np.float32)}),
            r"tensor 'decoder\.0\.weight' has shape \(128, 512, 1, 1\), expected \(128, 64, 1, 1\)",
        ),
        (lambda w: w.pop("_vq_vae._embedding"), r"missing tensor '_vq_vae\._embedding'"),
        (
            lambda w: w.update({"decoder.12.bias": np.zeros(1, np.int32)}),
            r"tensor 'decoder\.12\.bias' has dtype int32, expected a float type",
        ),
    ],
)
def test_strict_loading_names_tensor_and_file(tmp_path, edit, message):
    weights = random_decoder_weights(CODEBOOK_DIM)
    edit(weights)
    path = _save(tmp_path / "broken.npz", weights)
    with pytest.raises(mp.CheckpointError, match=f"broken.npz: {message}"):
        mp.load_mask_decoder(path)


def test_two_problems_are_counted(tmp_path):
    weights = random_decoder_weights(CODEBOOK_DIM)
    del weights["decoder.4.weight"], weights["decoder.4.bias"]
    with pytest.raises(mp.CheckpointError, match=r"missing tensor 'decoder\.4\.bias' .*\(and 1 more\)"):
        mp.load_mask_decoder(_save(tmp_path / "two.npz", weights))


def test_encoder_tensors_of_a_whole_vqvae_are_skipped(tmp_path, codes):
    weights = random_decoder_weights(CODEBOOK_DIM)
    plain = mp.load_mask_decoder(_save(tmp_path / "plain.npz", weights)).decode(codes[:2])
    weights["encoder.0.weight"] = np.ones((4, 4), np.float32)
    weights["_vq_vae._ema_w"] = np.ones((128, CODEBOOK_DIM), np.float32)
    tensors, _ = load_decoder_tensors(_save(tmp_path / "whole.npz", weights))
    assert set(tensors) == set(expected_shapes(CODEBOOK_DIM))
    assert np.array_equal(mp.load_mask_decoder(tmp_path / "whole.npz").decode(codes[:2]), plain)


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"_vq_vae._embedding": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(mp.CheckpointError, match="pickled.npz: holds pickled objects, which are never unpickled"):
        mp.load_mask_decoder(path)


def test_unusable_paths_say_what_is_wrong(tmp_path, decoder_npz):
    with pytest.raises(mp.CheckpointError, match="no such file or directory, and not a hub repo id"):
        mp.load_mask_decoder(tmp_path / "missing.npz")
    with pytest.raises(mp.CheckpointError, match="no mask decoder here"):
        mp.load_mask_decoder(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(mp.CheckpointError, match=r"notes.txt: expected a \.npz or \.safetensors"):
        mp.load_mask_decoder(tmp_path / "notes.txt")
    (tmp_path / "a.npz").write_bytes(b"not a zip")
    with pytest.raises(mp.CheckpointError, match="a.npz: not a readable .npz archive"):
        mp.load_mask_decoder(tmp_path)  # the folder's only candidate
    (tmp_path / "b.safetensors").write_bytes(b"\x00")
    with pytest.raises(mp.CheckpointError, match=r"several candidate mask decoders \(a.npz, b.safetensors\)"):
        mp.load_mask_decoder(tmp_path)
    with pytest.raises(mp.CheckpointError, match="b.safetensors: not a readable safetensors file"):
        mp.load_mask_decoder(tmp_path / "b.safetensors")
    with pytest.raises(mp.CheckpointError, match="backend must be 'mlx' or 'torch'"):
        mp.load_mask_decoder(decoder_npz, backend="jax")
    with pytest.raises(mp.CheckpointError, match="device applies to backend='torch' only"):
        mp.load_mask_decoder(decoder_npz, device="cpu")


def test_convert_cli(decoder_npz, tmp_path, capsys):
    from mlx_paligemma.convert_mask_decoder import main

    out = tmp_path / "dec.safetensors"
    done = subprocess.run(  # once as users run it
        [sys.executable, "-m", "mlx_paligemma.convert_mask_decoder", str(decoder_npz), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and out.is_file() and done.stdout.strip() == str(out), done.stderr
    capsys.readouterr()
    assert main([str(decoder_npz), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dec.safetensors: exists; pass --force to overwrite it" in err
    assert main([str(decoder_npz), str(out), "--force"]) == 0
    assert main([str(tmp_path / "nothing.npz"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing.npz: no such file or directory" in err
    assert main([str(decoder_npz), str(tmp_path / "x.bin")]) == 2
    assert "the output must end in .safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("inp, out, size", [(128, 128, 4), (32, 16, 9)])
def test_upsample_equals_torch_conv_transpose(inp, out, size):
    """The sub-pixel form of the MLX module is the same linear map as ConvTranspose2d(in, out, 4, 2, 1)."""
    import mlx.core as mx
    import torch

    from mlx_paligemma.models.mask_decoder import Upsample, subpixel_kernel

    rng = np.random.default_rng(inp + size)
    x = rng.standard_normal((2, inp, size, size + 3)).astype(np.float32)  # non-square: rows vs columns
    conv = torch.nn.ConvTranspose2d(inp, out, 4, stride=2, padding=1)
    with torch.no_grad():
        expected = conv(torch.from_numpy(x)).numpy()
    up = Upsample(inp, out)
    up.weight = mx.array(subpixel_kernel(conv.weight.detach().numpy()))
    up.bias = mx.array(np.tile(conv.bias.detach().numpy(), 4))
    got = np.array(up(mx.array(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert got.shape == expected.shape == (2, out, 2 * size, 2 * size + 6)
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
