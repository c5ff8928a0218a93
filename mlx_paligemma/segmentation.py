"""Segmentation masks from PaliGemma's `segment` answers: parse, decode, paste, encode, draw.

An answer holds, per object, `<locY0><locX0><locY1><locX1>`, sixteen `<segNNN>` codes and the label
(`tasks.parse_detections` reads them). The codes of all objects are decoded in one batched call of
the mask decoder (`mask_decoder.load_mask_decoder`, either backend) into 64x64 logits, each resized
into its box in the original image and thresholded at 0, as big_vision's evaluator does:

    decoder = mp.load_mask_decoder("vae-oid.npz")
    segs = mp.segment(model, processor, "cat.jpg", ["cat", "dog"], mask_decoder=decoder)
    mp.draw_segmentations(image, segs).save("out.png")
    rle = mp.mask_to_rle(segs[0].mask)  # COCO's uncompressed RLE, as pycocotools reads it
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from .errors import PaliGemmaError
from .tasks import _COLOURS, parse_detections, segment_prompt


@dataclass
class Segmentation:
    label: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in original-image pixels
    mask: np.ndarray  # (height, width) bool, the original image's size
    codes: list[int]  # the 16 codebook indices the mask was decoded from

    def to_dict(self) -> dict:
        """JSON-ready: label, box, the mask as COCO uncompressed RLE, its area in pixels, the codes."""
        return {
            "label": self.label,
            "box": [round(v, 2) for v in self.box],
            "mask": mask_to_rle(self.mask),
            "area": int(self.mask.sum()),
            "codes": self.codes,
        }


def pixel_box(box: tuple[float, float, float, float], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The integer pixel rectangle a mask is pasted into: coordinates truncated (as big_vision's
    evaluator does), clipped to the image. May be empty (x1 <= x0 or y1 <= y0)."""
    width, height = image_size
    x0, y0, x1, y1 = (int(v) for v in box)
    return max(0, min(x0, width)), max(0, min(y0, height)), max(0, min(x1, width)), max(0, min(y1, height))


def paste_mask(logits: np.ndarray, box: tuple[float, float, float, float], image_size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask of one object: its 64x64 logits resized bilinearly to the box, > 0.

    The resize is PIL's BILINEAR on a float image, the one big_vision's evaluator uses (it
    antialiases when the box is smaller than 64 pixels). An empty box gives an empty mask.
    """
    width, height = image_size
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = pixel_box(box, image_size)
    if x1 <= x0 or y1 <= y0:
        return mask
    resized = Image.fromarray(np.asarray(logits, dtype=np.float32)).resize(  # float32 -> PIL mode "F"
        (x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR
    )
    mask[y0:y1, x0:x1] = np.asarray(resized) > 0.0
    return mask


def parse_segmentations(text: str, image_size: tuple[int, int], decoder: Any) -> list[Segmentation]:
    """Every well-formed object of a segmentation answer, with its mask in the original image.

    `image_size` is the original image's (width, height); `decoder` is a mask decoder of either
    backend (anything with `decode(codes) -> (B, 64, 64)` numpy logits). Objects with a wrong
    number of codes, codes out of range or inverted boxes are skipped, as `parse_detections`
    skips them; objects with a box but no codes (detection answers) have no mask and are skipped.
    Boxes use bin / 1024 like the rest of the package; big_vision's evaluator divides by 1023 (a
    difference under 0.1%, at most one pixel on a 1024-pixel side).
    """
    objects = [d for d in parse_detections(text, image_size) if d.seg_codes is not None]
    if not objects:
        return []
    logits = decoder.decode(np.array([d.seg_codes for d in objects], dtype=np.int32))
    return [
        Segmentation(d.label, d.box, paste_mask(m, d.box, image_size), list(d.seg_codes))
        for d, m in zip(objects, logits)
    ]


def segment(
    model: Any,
    processor: Any,
    image: Any,
    labels: Union[str, Sequence[str]],
    mask_decoder: Any,
    constrain: bool = True,
    **kwargs,
) -> list[Segmentation]:
    """Masks, in the original image's pixels, of the named kinds of object (`segment cat ; dog`).

    Works with a model of either backend; `mask_decoder` may be of either backend too.
    `kwargs` are `generate`'s (max_tokens, temperature, ...). With `constrain` (the default) the
    answer is restricted to the segmentation grammar (`grammar.answer_grammar`), so it always parses.
    """
    from .generation import generate
    from .grammar import requested_only, with_answer_grammar

    prompt = segment_prompt(labels)
    if not constrain:
        result = generate(model, processor, image, prompt, **kwargs)
        return parse_segmentations(result.text, result.image_size, mask_decoder)
    result = generate(model, processor, image, prompt, **with_answer_grammar(processor, prompt, kwargs))
    return requested_only(parse_segmentations(result.text, result.image_size, mask_decoder), prompt)


# --- COCO run-length encoding ----------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: `{"size": [H, W], "counts": [...]}`, runs in column-major order,
    starting with a run of zeros (0 when the first pixel is set), as `pycocotools.mask.frPyObjects` reads it."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise PaliGemmaError(f"mask_to_rle: expected a 2-D mask, got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """The (H, W) bool mask of an uncompressed COCO RLE (`mask_to_rle`'s inverse)."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise PaliGemmaError(f"rle_to_mask: expected {{'size': [H, W], 'counts': [...]}} ({e})") from None
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != height * width:
        raise PaliGemmaError(f"rle_to_mask: counts must be non-negative and sum to H*W = {height * width}")
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape((height, width), order="F")


# --- drawing ---------------------------------------------------------------------------------------------


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=False)
        mask = mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def draw_segmentations(image: Image.Image, segmentations: Iterable[Segmentation], alpha: float = 0.45) -> Image.Image:
    """A copy of the image (original size, RGB) with each mask filled in a semi-transparent colour of
    its own, outlined in that colour, and labelled at its box's corner."""
    from .processor import to_rgb

    canvas = np.asarray(to_rgb(image), dtype=np.float32).copy()
    segmentations = list(segmentations)
    for seg in segmentations:
        if seg.mask.shape != canvas.shape[:2]:
            raise PaliGemmaError(
                f"draw_segmentations: mask of '{seg.label}' is {seg.mask.shape[::-1]} (W, H), "
                f"the image {canvas.shape[1::-1]}: draw on the image the answer was parsed for"
            )
    line = max(1, round(min(canvas.shape[:2]) / 300))
    colours = [np.array(ImageColor.getrgb(_COLOURS[i % len(_COLOURS)]), np.float32) for i in range(len(segmentations))]
    for seg, colour in zip(segmentations, colours):
        canvas[seg.mask] = (1 - alpha) * canvas[seg.mask] + alpha * colour
    for seg, colour in zip(segmentations, colours):
        canvas[_dilate(_edge(seg.mask), line - 1)] = colour
    out = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    for seg, colour in zip(segmentations, colours):
        if seg.label:
            x, y = seg.box[0], max(seg.box[1] - 12, 0)
            fill = tuple(int(c) for c in colour)
            draw.rectangle(draw.textbbox((x, y), seg.label), fill=fill)
            draw.text((x, y), seg.label, fill="white")
    return out
