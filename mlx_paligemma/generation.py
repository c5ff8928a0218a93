"""The friendly generation API (generate, stream_generate, caption, answer, detect, encode_image)
over the one decode loop in `engine.py`.

Backend-neutral: the engine drives an MLX model or the PyTorch reference through a small runner
each; sampling (mlx-lm's samplers, copied in `sampling`) and streaming detokenisation are
shared. Each model gets its own engine (kept on the model): calls from several threads are
batched together and serialised, and breaking out of `stream_generate` cancels its row, whose
cache rows leave the batch at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .accel import generation_session
from .engine import (
    Detokenizer,
    Request,
    SamplingOptions,
    check_prompt_length,
    engine_for,
    option_errors,
)
from .errors import PaliGemmaError
from .grammar import requested_only, with_answer_grammar
from .processor import ImageInput, Processor
from .tasks import Detection, answer_prompt, caption_prompt, detect_prompt, parse_detections

__all__ = ["Detokenizer", "check_prompt_length", "option_errors"]  # re-exported for the CLI and tests


@dataclass
class ImageEmbedding:
    """An image run through the vision tower once; pass it instead of an image to reuse it."""

    features: Any  # backend array (1, N, text hidden)
    image_size: tuple[int, int]  # original (width, height), for mapping boxes back


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # per row, image tokens included
    generation_tokens: int = 0  # per row, for the longest row
    batch_size: int = 1
    vision_time: float = 0.0  # seconds in the vision tower (0 when embeddings were reused)
    prefill_time: float = 0.0
    generation_time: float = 0.0
    prefill_tps: float = 0.0  # prompt tokens per second, all rows
    generation_tps: float = 0.0  # generated tokens per second, all rows
    peak_memory_gb: float = 0.0


@dataclass
class GenerationChunk:
    text: str  # new text since the previous chunk of this row
    token_id: int
    row: int = 0
    finish_reason: Optional[str] = None  # "stop" (eos) or "length" on a row's last chunk
    stats: GenerationStats = field(default_factory=GenerationStats)
    # On a row's last chunk: its whole answer and ids (a stop string may end the text inside a token).
    row_text: Optional[str] = None
    row_token_ids: Optional[list[int]] = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    image_size: tuple[int, int]
    stats: GenerationStats


def encode_image(model: Any, processor: Processor, image: ImageInput) -> ImageEmbedding:
    """Run the vision tower once; the result can be passed as `image` to many prompts. The engine's
    vision cache also remembers it: the same image passed again is not encoded again."""
    pil = processor.load_image(image)
    features, _ = engine_for(model).encode(processor.preprocess_image(pil))
    return ImageEmbedding(features, pil.size)


def _row_processors(logits_processors: Any, rows: int) -> list[list]:
    """One list per row: a list of lists is per row; a flat list applies to every row (stateless ones)."""
    if not logits_processors:
        return [[] for _ in range(rows)]
    if all(isinstance(p, (list, tuple)) for p in logits_processors):
        if len(logits_processors) != rows:
            raise PaliGemmaError(f"logits_processors: {len(logits_processors)} lists for {rows} prompts")
        return [list(p) for p in logits_processors]
    return [list(logits_processors) for _ in range(rows)]


def _requests(
    model: Any,
    processor: Processor,
    images: Sequence[Union[ImageInput, ImageEmbedding]],
    prompts: Sequence[str],
    max_tokens: int = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[Union[str, int]] = (),
    logits_processors: Any = (),
) -> list[Request]:
    """Check and prepare every row before any model work: options, prompt length, model-size images."""
    if len(images) != len(prompts):
        raise PaliGemmaError(f"{len(images)} images for {len(prompts)} prompts: pass one image per prompt")
    processors = _row_processors(logits_processors, len(prompts))
    stop = [stop] if isinstance(stop, (str, int)) else list(stop)
    requests = []
    for image, prompt, procs in zip(images, prompts, processors):
        options = SamplingOptions(max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, procs)
        options.check()
        ids = processor.prompt_ids(prompt)[0]
        check_prompt_length(model, len(ids))
        request = Request(ids, processor, options=options)
        if isinstance(image, ImageEmbedding):
            if image.features.shape[1] != processor.num_image_tokens:
                raise PaliGemmaError(
                    f"image {len(requests)}: an ImageEmbedding of {image.features.shape[1]} image tokens; this "
                    f"model takes {processor.num_image_tokens} (was it encoded by another model?)"
                )
            request.features = image.features
        requests.append(request)
    for request, image in zip(requests, images):  # decode and resize only once everything else is known good
        if request.features is None:
            request.pixel_values = processor.preprocess_image(image)
    return requests


def _stream_batch(
    model: Any,
    processor: Processor,
    images: Sequence[Union[ImageInput, ImageEmbedding]],
    prompts: Sequence[str],
    **options: Any,
) -> Iterator[GenerationChunk]:
    """Every library generation runs through here: its rows join the model's engine, inside the device's
    generation session (Apple silicon: wired limit, cache cleared after)."""
    requests = _requests(model, processor, images, prompts, **options)
    engine = engine_for(model)
    with generation_session(model, engine.stream):
        yield from _chunks(engine, requests)


def _chunks(engine: Any, requests: list[Request]) -> Iterator[GenerationChunk]:
    """The engine's tokens for these rows as chunks, with the statistics of the call as a whole."""
    B = len(requests)
    stats = GenerationStats(batch_size=B, prompt_tokens=max(len(r.input_ids) for r in requests))
    tic = time.perf_counter()
    first: Optional[float] = None
    counts = [0] * B
    for i, token in engine.run(requests):
        row = token.row
        now = time.perf_counter()
        if first is None:
            first = now
            stats.vision_time = row.vision_time  # the vision pass of its admission group
            stats.prefill_time = now - tic - stats.vision_time  # prompt + first token, vision apart
            stats.prefill_tps = B * stats.prompt_tokens / max(stats.prefill_time, 1e-9)
        counts[i] = len(row.token_ids) + (token.finish_reason == "stop" and token.token_id in row.stop_ids)
        stats.generation_tokens = max(counts)
        stats.generation_time = now - first
        decoded = sum(counts) - B
        stats.generation_tps = decoded / stats.generation_time if stats.generation_time > 0 and decoded > 0 else 0.0
        stats.peak_memory_gb = engine.runner.peak_memory_gb()
        final = token.finish_reason is not None
        yield GenerationChunk(
            token.text,
            token.token_id,
            i,
            token.finish_reason,
            stats,
            row.text if final else None,
            list(row.token_ids) if final else None,
        )


def stream_generate(
    model: Any, processor: Processor, image: Union[ImageInput, ImageEmbedding], prompt: str, **kwargs
) -> Iterator[GenerationChunk]:
    """Stream the answer to one prompt about one image, chunk by chunk (same options as `generate`)."""
    return _stream_batch(model, processor, [image], [prompt], **kwargs)


def generate(
    model: Any,
    processor: Processor,
    image: Union[ImageInput, ImageEmbedding, Sequence[Union[ImageInput, ImageEmbedding]]],
    prompt: Union[str, Sequence[str]],
    max_tokens: int = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[Union[str, int]] = (),
    logits_processors: Any = (),
) -> Union[GenerationResult, list[GenerationResult]]:
    """Answer a prompt about an image; lists of images and prompts run as one batch (a list back).

    `stop`: strings or token ids that end an answer (besides eos; a string is cut from the text).
    `logits_processors`: mlx-lm's `proc(tokens, logits) -> logits`, applied in order after the
    repetition penalty; for a batch, one list per prompt (or one list shared by every row)."""
    batched = not isinstance(prompt, str)
    prompts = list(prompt) if batched else [prompt]
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    sizes = [im.image_size if isinstance(im, ImageEmbedding) else None for im in images]
    pils = [im if isinstance(im, ImageEmbedding) else processor.load_image(im) for im in images]
    sizes = [s or p.size for s, p in zip(sizes, pils)]
    chunks = _stream_batch(
        model,
        processor,
        pils,
        prompts,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        logits_processors=logits_processors,
    )
    results = collect_results(processor, chunks, sizes)
    return results if batched else results[0]


def collect_results(
    processor: Processor, chunks: Iterable[GenerationChunk], image_sizes: Sequence[tuple[int, int]]
) -> list[GenerationResult]:
    """Gather a stream's chunks into one result per row (what `generate` returns); a caller that
    prints chunks as they come (the CLI) passes them through here to get the same results."""
    ids: list[list[int]] = [[] for _ in image_sizes]
    texts: list[Optional[str]] = [None] * len(image_sizes)
    reasons = ["length"] * len(image_sizes)
    stats = GenerationStats()
    for chunk in chunks:
        stats = chunk.stats
        if chunk.finish_reason == "stop":
            reasons[chunk.row] = "stop"
        else:
            ids[chunk.row].append(chunk.token_id)
        if chunk.row_token_ids is not None:
            ids[chunk.row], texts[chunk.row] = chunk.row_token_ids, chunk.row_text
    return [
        GenerationResult(processor.decode(t) if text is None else text, t, r, s, stats)
        for t, text, r, s in zip(ids, texts, reasons, image_sizes)
    ]


def caption(
    model: Any, processor: Processor, image: Union[ImageInput, ImageEmbedding], lang: str = "en", **kwargs
) -> str:
    """A caption in language `lang` (`caption en`)."""
    return generate(model, processor, image, caption_prompt(lang), **kwargs).text


def answer(
    model: Any,
    processor: Processor,
    image: Union[ImageInput, ImageEmbedding],
    question: str,
    lang: str = "en",
    **kwargs,
) -> str:
    """The answer to a question about the image (`answer en <question>`)."""
    return generate(model, processor, image, answer_prompt(question, lang), **kwargs).text


def detect(
    model: Any,
    processor: Processor,
    image: Union[ImageInput, ImageEmbedding],
    labels: Union[str, Sequence[str]],
    constrain: bool = True,
    **kwargs,
) -> list[Detection]:
    """Boxes, in the original image's pixels, of the named kinds of object (`detect cat ; dog`).

    With `constrain` (the default) the answer is restricted to the detection grammar
    (`grammar.answer_grammar`): four locs, a requested label, ` ; ` or the end, so it always parses.
    """
    prompt = detect_prompt(labels)
    if not constrain:
        result = generate(model, processor, image, prompt, **kwargs)
        return parse_detections(result.text, result.image_size)
    result = generate(model, processor, image, prompt, **with_answer_grammar(processor, prompt, kwargs))
    return requested_only(parse_detections(result.text, result.image_size), prompt)
