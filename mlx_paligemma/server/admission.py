"""Admission: everything a request needs before it may queue, done in the HTTP layer's threads.

The image is decoded and checked (`app.load_image_url`), resized to the model's input size and
normalised; the prompt is tokenised and its length checked against the model's positions. What
reaches the engine's queue is model-size (3 x 224 x 224 floats for a 224 model, however large
the upload was), and a request that cannot run fails here, alone, with its 4xx, so it never
meets a batch-mate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..engine import Request, SamplingOptions, check_prompt_length
from ..errors import PaliGemmaError
from ..sampling import LogitsProcessor
from .batcher import Job


class AdmissionError(PaliGemmaError):
    """A request the model cannot take (the HTTP layer answers 400 with this message)."""


def admit(
    model: Any,
    processor: Any,
    image: Image.Image,
    prompt: str,
    options: dict,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Job:
    """A queueable job: model-size pixels, prompt ids, sampling options (from `app.sampling_options`)."""
    ids = processor.prompt_ids(prompt)[0]
    try:
        check_prompt_length(model, len(ids))
    except PaliGemmaError as e:
        raise AdmissionError(str(e)) from None
    sampling = SamplingOptions(
        max_tokens=options["max_tokens"],
        temperature=options["temperature"],
        top_p=options["top_p"],
        seed=options["seed"],
        logits_processors=list(logits_processors),
    )
    pixels = processor.preprocess_image(image)
    return Job(Request(ids, processor, pixels, options=sampling), image.size)
