"""PaliGemma task prompts and the parsing of their answers (`<locYYYY>` boxes, `<segNNN>` codes).

Detection answers are `<locY0><locX0><locY1><locX1> label` per object, joined by ` ; `, with
coordinates in 1024 bins over the (square, resized) model input; since that resize ignores
the aspect ratio, bin / 1024 maps linearly onto each axis of the original image.
Segmentation answers add 16 `<segNNN>` codes (a 4x4 grid of a VQ-VAE codebook) before the label.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image, ImageDraw

from .errors import PaliGemmaError

LOC_BINS = 1024
SEG_CODES = 16  # <seg> tokens per object in a segmentation answer

_OBJECT = re.compile(
    r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>"  # y0 x0 y1 x1
    r"((?:\s*<seg\d{3}>)*)"  # segmentation codes: none, or 16 in a well-formed answer
    r"\s*([^<;]*)"
)  # label, up to the next token or ';'
_SEG = re.compile(r"<seg(\d{3})>")


@dataclass
class Detection:
    label: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in original-image pixels
    seg_codes: Optional[list[int]] = field(default=None)  # 16 codebook indices for segmentation answers

    def to_dict(self) -> dict:
        d = {"label": self.label, "box": [round(v, 2) for v in self.box]}
        if self.seg_codes is not None:
            d["seg_codes"] = self.seg_codes
        return d


def parse_detections(text: str, image_size: tuple[int, int]) -> list[Detection]:
    """Every well-formed object in a detection or segmentation answer; malformed parts are skipped.

    `image_size` is the original image's (width, height).
    """
    width, height = image_size
    found = []
    for m in _OBJECT.finditer(text):
        y0, x0, y1, x1 = (int(v) for v in m.group(1, 2, 3, 4))
        if max(y0, x0, y1, x1) >= LOC_BINS or y1 < y0 or x1 < x0:
            continue
        codes = [int(c) for c in _SEG.findall(m.group(5))] if m.group(5) else None
        if codes is not None and (len(codes) != SEG_CODES or max(codes) >= 128):
            continue
        box = (x0 / LOC_BINS * width, y0 / LOC_BINS * height, x1 / LOC_BINS * width, y1 / LOC_BINS * height)
        found.append(Detection(m.group(6).strip(), box, codes))
    return found


def caption_prompt(lang: str = "en") -> str:
    return f"caption {lang}"


def answer_prompt(question: str, lang: str = "en") -> str:
    return f"answer {lang} {question.strip()}"


def detect_prompt(labels: Sequence[str] | str) -> str:
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels or any(not label.strip() or ";" in label for label in labels):
        raise PaliGemmaError(f"detect: labels must be non-empty and contain no ';', got {labels!r}")
    return "detect " + " ; ".join(label.strip() for label in labels)


def segment_prompt(labels: Sequence[str] | str) -> str:
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels or any(not label.strip() or ";" in label for label in labels):
        raise PaliGemmaError(f"segment: labels must be non-empty and contain no ';', got {labels!r}")
    return "segment " + " ; ".join(label.strip() for label in labels)


_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def draw_detections(image: Image.Image, detections: Iterable[Detection]) -> Image.Image:
    """A copy of the image (original size, RGB) with each box outlined and labelled."""
    from .processor import to_rgb

    canvas = to_rgb(image).copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 200))
    colour_of: dict[str, str] = {}
    for det in detections:
        colour = colour_of.setdefault(det.label, _COLOURS[len(colour_of) % len(_COLOURS)])
        draw.rectangle(det.box, outline=colour, width=line)
        if det.label:
            x, y = det.box[0], max(det.box[1] - 12, 0)
            text_box = draw.textbbox((x, y), det.label)
            draw.rectangle(text_box, fill=colour)
            draw.text((x, y), det.label, fill="white")
    return canvas
