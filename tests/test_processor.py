"""Processor: pixels equal transformers' SigLIP PIL path; token layout equals PaliGemmaProcessor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as mp
from mlx_paligemma.config import load_config
from mlx_paligemma.processor import Processor, load_image
from tests.helpers import noise_image, png_claiming_size

# Measured: max |ours - transformers| = 0 to ~2.4e-7 (float32 rounding of the same PIL resize).
PIXEL_TOL = 1e-5


@pytest.fixture(scope="module")
def processor(pg1_dir) -> Processor:
    return Processor.from_dir(pg1_dir, load_config(pg1_dir))


def transformers_pixels(image: Image.Image, size: int) -> np.ndarray:
    from transformers import SiglipImageProcessorPil

    hf = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return hf(images=[image], return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(97, 61), (20, 33)])
def test_pixels_match_transformers(processor, mode, size):
    image = noise_image(*size, mode=mode, seed=sum(size))
    ours = processor.preprocess_image(image)
    ref = transformers_pixels(image, processor.image_size)
    assert ours.dtype == np.float32 and ours.shape == (3, processor.image_size, processor.image_size)
    assert np.abs(ours - ref).max() <= PIXEL_TOL


def test_transparency_is_composited_on_white(processor):
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert np.allclose(processor.preprocess_image(clear), 1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: noise_image(40, 30).convert("P"),
        lambda: noise_image(40, 30).convert("CMYK"),
        lambda: Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)),  # 16-bit white
    ],
)
def test_other_modes_become_rgb(processor, make):
    image = make()
    pixels = processor.preprocess_image(image)
    assert pixels.shape == (3, processor.image_size, processor.image_size)
    expected = processor.preprocess_image(image.convert("RGB")) if image.mode != "I;16" else 1.0
    assert np.allclose(pixels, expected, atol=PIXEL_TOL)


def test_sixteen_bit_keeps_its_range(processor):
    """PIL's own convert() clips 16-bit at 255, which would turn mid-grey into white."""
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert np.allclose(processor.preprocess_image(grey), 128 / 255 * 2 - 1, atol=1e-5)


def test_paths_and_numpy_arrays_are_images(processor, tmp_path):
    image = noise_image(33, 21)
    image.save(tmp_path / "x.png")
    ref = processor.preprocess_image(image)
    assert np.array_equal(processor.preprocess_image(tmp_path / "x.png"), ref)
    assert np.array_equal(processor.preprocess_image(np.asarray(image)), ref)


def test_bad_images_are_clear_errors(processor, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(mp.ProcessorError, match="notes.txt: not a readable image"):
        processor.preprocess_image(tmp_path / "notes.txt")
    with pytest.raises(mp.ProcessorError, match="missing.png: image file not found"):
        processor.preprocess_image(tmp_path / "missing.png")
    with pytest.raises(mp.ProcessorError, match="dtype float64"):
        processor.preprocess_image(np.zeros((4, 4, 3)))


def test_a_directory_is_not_an_image(processor, tmp_path):
    with pytest.raises(mp.ProcessorError, match=f"{tmp_path.name}: is a directory, not an image file"):
        processor.preprocess_image(tmp_path)


def test_images_over_the_pixel_limit_are_refused_from_the_header(processor, tmp_path):
    """A 20000x20000 image once escaped as PIL's DecompressionBombError with a traceback."""
    bomb = png_claiming_size(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(mp.ProcessorError, match=r"400 megapixels, over the limit of 100 megapixels; .*\(max_image_pix"):
        processor.preprocess_image(bomb)
    with pytest.raises(mp.ProcessorError, match="over the limit of 0.01 megapixels"):
        load_image(png_claiming_size(tmp_path / "small.png", 200, 100), max_pixels=10_000)


def test_the_pixel_limit_can_be_raised_and_pil_never_warns(processor, tmp_path, monkeypatch):
    """PIL warns above 89 MP and fails above 179 MP; our limit replaces its guard, silently."""
    bomb = png_claiming_size(tmp_path / "bomb.png", 20000, 20000)
    monkeypatch.setattr(processor, "max_image_pixels", 500_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(mp.ProcessorError, match="bomb.png: not a readable image"):  # past the limit: decoded
            processor.preprocess_image(bomb)
        with pytest.raises(mp.ProcessorError, match="not a readable image"):
            processor.preprocess_image(png_claiming_size(tmp_path / "big.png", 10000, 10000))
    assert [str(w.message) for w in caught] == []
    assert Image.MAX_IMAGE_PIXELS == 89_478_485, "PIL's own guard is restored for everyone else"


@pytest.fixture(scope="module")
def hf_processor(pg1_dir):
    from transformers import PaliGemmaProcessor

    return PaliGemmaProcessor.from_pretrained(pg1_dir)


@pytest.mark.parametrize(
    "prompt",
    [
        "caption en",
        "answer en what is on the table?\nbe brief",
        "  leading spaces",
        "ocr café ☕ 42",
        "detect cat ; dog",
    ],
)
def test_token_ids_match_paligemma_processor(processor, hf_processor, prompt):
    image = noise_image(20, 20)
    ours = processor(images=[image], prompts=[prompt])
    ref = hf_processor(images=[image], text=[prompt], return_tensors="np")
    assert np.asarray(ours["input_ids"]).tolist() == ref["input_ids"].tolist()


def test_suffix_ids_and_types_match_paligemma_processor(processor, hf_processor):
    image = noise_image(20, 20)
    ours = processor(images=[image], prompts=["answer en what?"], suffixes=["a red car"])
    ref = hf_processor(images=[image], text=["answer en what?"], suffix=["a red car"], return_tensors="np")
    assert np.asarray(ours["input_ids"]).tolist() == ref["input_ids"].tolist()
    assert np.asarray(ours["token_type_ids"]).tolist() == ref["token_type_ids"].tolist()
    assert ours["input_ids"][0, -1] == processor.tokenizer.eos_id


def test_token_layout_comes_from_tokenizer_and_config(processor, pg1_dir):
    config = load_config(pg1_dir)
    ids = processor(images=[noise_image(9, 9)], prompts=["caption en"])["input_ids"][0].tolist()
    n = config.num_image_tokens
    assert ids[:n] == [config.image_token_id] * n
    assert ids[n] == processor.tokenizer.bos_id
    assert ids[n + 1 :] == processor.tokenizer.encode("caption en\n")


def test_batch_is_left_padded_with_mask(processor):
    batch = processor(images=[noise_image(9, 9), noise_image(9, 9)], prompts=["ocr", "answer en a longer one"])
    mask, ids = np.asarray(batch["attention_mask"]), np.asarray(batch["input_ids"])
    short = len(processor.prompt_ids("ocr")[0])
    pad = ids.shape[1] - short
    assert pad > 0 and mask[0, :pad].sum() == 0 and mask[0, pad:].all() and mask[1].all()
    assert (ids[0, :pad] == processor.tokenizer.pad_id).all()
    assert batch["pixel_values"].shape == (2, 3, processor.image_size, processor.image_size)


def test_mismatched_batch_is_an_error(processor):
    with pytest.raises(mp.ProcessorError, match="2 images for 1 prompts"):
        processor(images=[noise_image(9, 9)] * 2, prompts=["ocr"])
