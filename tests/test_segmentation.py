"""Segmentation answers -> masks: parsing, pasting into the original image, COCO RLE, drawing, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as mp
from tools.make_random_mask_decoder import make_random_mask_decoder
from tools.make_scripted_checkpoint import make_scripted_checkpoint


@pytest.fixture(scope="module")
def decoder_npz(tmp_path_factory) -> Path:
    return make_random_mask_decoder(tmp_path_factory.mktemp("dec") / "vae-oid.npz", 64, seed=5)


@pytest.fixture(scope="module")
def decoder(decoder_npz):
    return mp.load_mask_decoder(decoder_npz)


def seg_object(y0: int, x0: int, y1: int, x1: int, codes, label: str) -> str:
    return f"<loc{y0:04d}><loc{x0:04d}><loc{y1:04d}><loc{x1:04d}>" + "".join(f"<seg{c:03d}>" for c in codes) + label


class HalfDecoder:
    """A stand-in decoder whose 64x64 logits are +1 on the top (or left) half, -1 elsewhere; counts its calls."""

    def __init__(self, side: str = "top"):
        self.side, self.batches = side, []

    def decode(self, codes):
        self.batches.append(np.asarray(codes).shape)
        logits = -np.ones((len(codes), 64, 64), np.float32)
        if self.side == "top":
            logits[:, :32, :] = 1.0
        else:
            logits[:, :, :32] = 1.0
        return logits


def test_mask_lands_in_its_box_of_a_non_square_image():
    # 640 x 320: x bins scale by 640, y bins by 320. Box x 256..768 -> 160..480 px, y 512..896 -> 160..280 px.
    text = seg_object(512, 256, 896, 768, range(16), " cat")
    (top,) = mp.parse_segmentations(text, (640, 320), HalfDecoder("top"))
    (left,) = mp.parse_segmentations(text, (640, 320), HalfDecoder("left"))
    assert top.label == "cat" and top.codes == list(range(16))
    assert top.box == pytest.approx((160, 160, 480, 280))
    assert top.mask.shape == (320, 640) and top.mask.dtype == bool
    expected = np.zeros((320, 640), bool)
    expected[160:220, 160:480] = True  # the top half of the box
    assert np.array_equal(top.mask, expected)
    expected = np.zeros((320, 640), bool)
    expected[160:280, 160:320] = True  # the left half of the box
    assert np.array_equal(left.mask, expected)


def test_pasting_matches_an_independent_resize(decoder):
    """Random-decoder logits, resized with torch's antialiased bilinear (PIL's filter), thresholded, placed."""
    import torch

    codes = np.random.default_rng(2).integers(0, 128, 16)
    size = (301, 157)
    cases = [(100, 50, 900, 700), (10, 900, 60, 1000), (0, 0, 1023, 1023)]  # larger and smaller than 64 px
    text = " ; ".join(seg_object(y0, x0, y1, x1, codes, f" o{i}") for i, (y0, x0, y1, x1) in enumerate(cases))
    segs = mp.parse_segmentations(text, size, decoder)
    logits = decoder.decode(codes[None])[0]
    assert len(segs) == 3
    for seg, (y0, x0, y1, x1) in zip(segs, cases):
        px0, py0 = int(x0 / 1024 * size[0]), int(y0 / 1024 * size[1])
        px1, py1 = int(x1 / 1024 * size[0]), int(y1 / 1024 * size[1])
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(logits)[None, None], size=(py1 - py0, px1 - px0), mode="bilinear", antialias=True
        )[0, 0].numpy()
        expected = np.zeros((size[1], size[0]), bool)
        expected[py0:py1, px0:px1] = resized > 0
        differ = seg.mask != expected
        assert not differ[:py0].any() and not differ[py1:].any()  # nothing outside the box
        assert np.abs(resized[differ[py0:py1, px0:px1]]).max(initial=0) < 1e-4  # only ties at the threshold
        assert seg.mask.any() and not seg.mask.all()


def test_several_objects_decode_in_one_batch():
    fake = HalfDecoder()
    text = " ; ".join(seg_object(0, 0, 512, 512, [i] * 16, f" thing {i}") for i in range(5))
    segs = mp.parse_segmentations(text, (100, 100), fake)
    assert [s.label for s in segs] == [f"thing {i}" for i in range(5)]
    assert [s.codes[0] for s in segs] == list(range(5))
    assert fake.batches == [(5, 16)]


def test_malformed_objects_are_skipped():
    good = seg_object(100, 100, 500, 500, range(16), " ok")
    text = " ; ".join(
        [
            seg_object(100, 100, 500, 500, range(15), " fifteen codes"),
            seg_object(100, 100, 500, 500, range(17), " seventeen codes"),
            seg_object(100, 100, 500, 500, [0] * 15 + [128], " code out of range"),
            seg_object(500, 100, 100, 500, range(16), " inverted box"),
            "<loc0100><loc0100><loc0500><loc0500> box without codes",
            "<loc0100><loc0100>" + "".join(f"<seg{c:03d}>" for c in range(16)) + " two locs",
            good,
        ]
    )
    fake = HalfDecoder()
    assert [s.label for s in mp.parse_segmentations(text, (50, 50), fake)] == ["ok"]
    assert mp.parse_segmentations("", (50, 50), fake) == [] and mp.parse_segmentations("a cat", (9, 9), fake) == []
    assert fake.batches == [(1, 16)]  # nothing decoded when there is nothing to decode


def test_a_box_under_one_pixel_gives_an_empty_mask():
    (seg,) = mp.parse_segmentations(seg_object(10, 10, 11, 11, range(16), " speck"), (64, 64), HalfDecoder())
    assert seg.mask.shape == (64, 64) and not seg.mask.any()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools 2.0 on numpy 2
def test_rle_round_trips_through_pycocotools(decoder):
    from pycocotools import mask as coco

    text = seg_object(0, 0, 1023, 700, range(16), " a") + " ; " + seg_object(300, 200, 900, 1000, range(50, 66), " b")
    masks = [s.mask for s in mp.parse_segmentations(text, (123, 77), decoder)]
    masks += [np.ones((5, 3), bool), np.zeros((4, 6), bool), np.eye(7, 4, dtype=bool)]
    for mask in masks:
        rle = mp.mask_to_rle(mask)
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        decoded = coco.decode(coco.frPyObjects(rle, *rle["size"]))
        assert np.array_equal(decoded.astype(bool), mask)
        assert int(coco.area(coco.frPyObjects(rle, *rle["size"]))) == mask.sum()
        assert np.array_equal(mp.rle_to_mask(json.loads(json.dumps(rle))), mask)
    assert mp.mask_to_rle(np.ones((2, 2), bool))["counts"] == [0, 4]  # a mask starting set opens with a 0 run
    with pytest.raises(mp.PaliGemmaError, match="sum to H\\*W = 4"):
        mp.rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_draw_tints_masks_and_leaves_the_rest():
    image = Image.new("RGB", (200, 120), (255, 255, 255))
    (seg,) = mp.parse_segmentations(seg_object(512, 512, 1000, 1000, range(16), " cat"), image.size, HalfDecoder())
    drawn = np.asarray(mp.draw_segmentations(image.convert("RGBA"), [seg]))
    assert drawn.shape == (120, 200, 3)
    ys, xs = np.nonzero(seg.mask)
    cy, cx = int(ys.mean()), int(xs.mean())
    assert (drawn[cy, cx] != 255).any()  # tinted inside
    assert (drawn[cy, cx] > 100).all()  # but semi-transparent: the white shows through
    assert (drawn[119, 0] == 255).all() and (drawn[10, 190] == 255).all()  # untouched away from mask and label
    assert (drawn[ys.min(), cx] == drawn[ys.min(), cx - 1]).all() and (drawn[ys.min(), cx] < 240).any()  # outline
    with pytest.raises(mp.PaliGemmaError, match=r"mask of 'cat' is \(200, 120\) \(W, H\), the image \(120, 200\)"):
        mp.draw_segmentations(image.rotate(90, expand=True), [seg])


# --- CLI ----------------------------------------------------------------------------------------------------

ANSWER = (
    seg_object(100, 200, 700, 900, range(20, 36), " cat") + " ; " + seg_object(400, 0, 1000, 500, range(16), " dog")
)
IMAGE_SIZE = (160, 96)


@pytest.fixture(scope="module")
def scripted_dir(pg1_dir, tmp_path_factory) -> Path:
    """The tiny PaliGemma 1 with its language model rewired to answer ANSWER to any prompt (the tiny random
    model never writes a well-formed segmentation answer); vision tower, processor and generation are real."""
    return make_scripted_checkpoint(pg1_dir, tmp_path_factory.mktemp("scripted") / "pg1", ANSWER)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.new("RGB", IMAGE_SIZE, (200, 200, 200)).save(path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_paligemma.generate", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_segment_end_to_end(scripted_dir, image_path, decoder_npz, backend):
    if backend == "mlx":
        model, processor = mp.load(scripted_dir)
    else:
        from mlx_paligemma import reference

        model, processor = reference.load(scripted_dir, device="cpu")
    decoder = mp.load_mask_decoder(decoder_npz, backend=backend, device="cpu" if backend == "torch" else None)
    segs = mp.segment(model, processor, image_path, ["cat", "dog"], mask_decoder=decoder, max_tokens=60)
    expected = mp.parse_segmentations(ANSWER, IMAGE_SIZE, mp.load_mask_decoder(decoder_npz))
    assert [s.label for s in segs] == ["cat", "dog"]
    for seg, ref in zip(segs, expected):
        assert seg.box == ref.box and seg.codes == ref.codes and np.array_equal(seg.mask, ref.mask)
    with pytest.raises(mp.PaliGemmaError, match="segment: labels"):
        mp.segment(model, processor, image_path, ["a ; b"], mask_decoder=decoder)


def test_cli_json_and_draw_give_masks(scripted_dir, image_path, decoder_npz, tmp_path):
    out_png = tmp_path / "seg.png"
    out = run_cli(
        "--model", str(scripted_dir), "--image", str(image_path), "--prompt", "segment cat ; dog", "--json",
        "--max-tokens", "60", "--mask-decoder", str(decoder_npz), "--draw", str(out_png),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"] == ANSWER
    expected = mp.parse_segmentations(ANSWER, IMAGE_SIZE, mp.load_mask_decoder(decoder_npz))
    assert [s["label"] for s in data["segmentations"]] == ["cat", "dog"]
    for got, seg in zip(data["segmentations"], expected):
        assert got["box"] == pytest.approx(seg.box, abs=0.01)
        assert got["mask"]["size"] == [IMAGE_SIZE[1], IMAGE_SIZE[0]]
        assert np.array_equal(mp.rle_to_mask(got["mask"]), seg.mask)
        assert got["area"] == seg.mask.sum() > 0

    drawn = np.asarray(Image.open(out_png).convert("RGB"))
    covered = expected[0].mask | expected[1].mask
    assert drawn.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0], 3)
    assert (drawn[covered] != 200).any(axis=1).all()  # every mask pixel is tinted or outlined
    assert (drawn[~covered] == 200).all(axis=1).mean() > 0.9  # elsewhere only the labels are drawn
    again = run_cli(
        "--model", str(scripted_dir), "--image", str(image_path), "--prompt", "segment cat",
        "--mask-decoder", str(decoder_npz), "--draw", str(out_png),
    )  # fmt: skip
    assert again.returncode == 2 and "pass --force" in again.stderr and again.stderr.count("\n") == 1


def test_cli_segment_without_decoder_prints_text_and_a_hint(scripted_dir, image_path):
    out = run_cli(
        "--model", str(scripted_dir), "--image", str(image_path), "--prompt", "segment cat ; dog", "--max-tokens", "60"
    )  # (asked "segment cat", the answer's "dog" would be out of the grammar)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ANSWER + "\n"
    assert out.stderr.count("\n") == 1 and "--mask-decoder" in out.stderr


def test_cli_bad_mask_decoder_is_a_one_line_error(pg1_dir, image_path, tmp_path):
    bad = tmp_path / "broken.npz"
    np.savez(bad, x=np.zeros(2, np.float32))
    for path in (bad, tmp_path / "missing.npz"):
        out = run_cli(
            "--model", str(pg1_dir), "--image", str(image_path), "--prompt", "segment cat",
            "--mask-decoder", str(path),
        )  # fmt: skip
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert path.name in out.stderr and out.stdout == ""
