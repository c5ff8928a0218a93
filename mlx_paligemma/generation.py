"""Text generation: one bidirectional prefill of image + prompt, then cached causal decoding.

Backend-neutral: a small runner per backend (MLX here, PyTorch in `reference`) does encode /
prefill / step; the loop, sampling (mlx-lm's samplers, copied in `sampling`) and streaming
detokenisation are shared. Nothing here is module-level state: two models can generate in
one process, and breaking out of `stream_generate` drops the cache with the generator.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .accel import generation_session, generation_stream, on_stream
from .errors import PaliGemmaError
from .grammar import requested_only, with_answer_grammar
from .processor import ImageInput, Processor, check_image_tokens
from .sampling import LogitsProcessor, make_repetition_penalty, make_sampler
from .sharding import rank0_tokens
from .tasks import Detection, answer_prompt, caption_prompt, detect_prompt, parse_detections


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


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    image_size: tuple[int, int]
    stats: GenerationStats


class MLXRunner:
    """Encode, prefill and step an MLX `Model` with its prefix-LM cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None
        self.stream = generation_stream()  # a dedicated stream on Apple silicon, as mlx-lm; None on the CPU

    def encode_image(self, pixel_values: np.ndarray) -> mx.array:
        with on_stream(self.stream):
            features = self.model.encode_image(mx.array(pixel_values))
            mx.eval(features)
        return features

    def prefill(self, input_ids: np.ndarray, features: mx.array, attention_mask: np.ndarray) -> mx.array:
        with on_stream(self.stream):
            self.cache = self.model.make_cache(attention_mask)
            return self.model.prefill(input_ids, features, self.cache)

    def step(self, tokens: mx.array) -> mx.array:
        with on_stream(self.stream):
            return self.model.decode_step(tokens, self.cache)

    @staticmethod
    def concat_features(features: Sequence[mx.array]) -> mx.array:
        return mx.concatenate(list(features), axis=0)

    @staticmethod
    def peak_memory_gb() -> float:
        return mx.get_peak_memory() / 1e9


def _runner(model: Any):
    if isinstance(model, nn.Module):
        return MLXRunner(model)
    from .reference.generation import TorchRunner

    return TorchRunner(model)


def encode_image(model: Any, processor: Processor, image: ImageInput) -> ImageEmbedding:
    """Run the vision tower once; the result can be passed as `image` to many prompts."""
    pil = processor.load_image(image)
    features = _runner(model).encode_image(processor.preprocess_image(pil)[None])
    return ImageEmbedding(features, pil.size)


class _Detokenizer:
    """Incremental text of one row, as `processor.decode(all ids)` would give it.

    Each step decodes only the ids since the previous chunk's start (as vLLM does): the
    previous chunk gives the new one its context (a leading space, a byte piece it completes),
    so the cost per token stays constant instead of growing with the answer. Text that ends in
    a partial UTF-8 character, or a run of byte pieces not yet ended, is held back until complete
    (the `tokenizers` decoder turns a whole run of bytes into text at once, valid or not).
    """

    def __init__(self, processor: Processor):
        self.decode = processor.decode
        self.byte_ids = getattr(processor.tokenizer, "byte_ids", frozenset())
        self.ids: list[int] = []
        self.prefix_offset = 0  # where the decoded window starts
        self.read_offset = 0  # ids before this are emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        emitted = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        if not final and (len(text) <= len(emitted) or text.endswith("\ufffd") or self.ids[-1] in self.byte_ids):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]


# Each generation option: the rule it must satisfy and the message when it does not. The library
# reports the parameter's name (`max_tokens: ...`), the CLI the flag's (`--max-tokens: ...`).
_OPTION_RULES = {
    "max_tokens": (lambda v: v >= 1, "must be at least 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0"),
    "repetition_penalty": (lambda v: v is None or v > 0, "must be > 0"),
}


def option_errors(**options: Any) -> list[tuple[str, str]]:
    """(parameter, message) for every generation option out of range."""
    return [
        (name, f"{message}, got {options[name]}")
        for name, (ok, message) in _OPTION_RULES.items()
        if name in options and not ok(options[name])
    ]


def _check_options(
    max_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: Optional[float]
) -> None:
    errors = option_errors(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )
    if errors:
        raise PaliGemmaError(f"{errors[0][0]}: {errors[0][1]}")


def check_prompt_length(model: Any, prompt_tokens: int) -> None:
    """Refuse a prefix the model has no positions for; the reference would run, slowly, into garbage."""
    limit = model.config.text_config.max_position_embeddings
    if prompt_tokens > limit:
        raise PaliGemmaError(
            f"the prompt is {prompt_tokens} tokens (image tokens included), more than the model's limit "
            f"of {limit} (max_position_embeddings): shorten it"
        )


def _stream_batch(
    model: Any,
    processor: Processor,
    images: Sequence[Union[ImageInput, ImageEmbedding]],
    prompts: Sequence[str],
    **options: Any,
) -> Iterator[GenerationChunk]:
    """Every generation (generate, stream_generate, the server's batches) runs through here, inside the
    device's generation session (Apple silicon: dedicated stream, wired limit, cache cleared after)."""
    with generation_session(model):
        yield from _generate_chunks(model, processor, images, prompts, **options)


def _generate_chunks(
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
    logits_processors: Optional[Sequence[Sequence[LogitsProcessor]]] = None,
) -> Iterator[GenerationChunk]:
    """`logits_processors`: per row, mlx-lm-shaped processors applied after the repetition penalty
    (one instance per row: a grammar's processor holds its row's state)."""
    _check_options(max_tokens, temperature, top_p, top_k, repetition_penalty)
    if len(images) != len(prompts):
        raise PaliGemmaError(f"{len(images)} images for {len(prompts)} prompts: pass one image per prompt")
    runner = _runner(model)
    stats = GenerationStats(batch_size=len(prompts))

    batch = processor.encode_prompts(prompts)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    stats.prompt_tokens = int(attention_mask.sum(axis=1).max())
    check_prompt_length(model, stats.prompt_tokens)

    # Vision: one batched pass over the images not embedded already.
    tic = time.perf_counter()
    raw = [i for i, image in enumerate(images) if not isinstance(image, ImageEmbedding)]
    features: list[Any] = [None if i in raw else image.features for i, image in enumerate(images)]
    if raw:
        encoded = runner.encode_image(np.stack([processor.preprocess_image(images[i]) for i in raw]))
        for j, i in enumerate(raw):
            features[i] = encoded[j : j + 1]
    stats.vision_time = time.perf_counter() - tic

    for i, f in enumerate(features):
        if f.shape[1] != processor.num_image_tokens:
            raise PaliGemmaError(
                f"image {i}: an ImageEmbedding of {f.shape[1]} image tokens; this model takes "
                f"{processor.num_image_tokens} (was it encoded by another model?)"
            )
    check_image_tokens(input_ids, len(features), processor.num_image_tokens, processor.image_token_id)

    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temperature, top_p, top_k)
    B = len(prompts)
    if logits_processors is not None and len(logits_processors) != B:
        raise PaliGemmaError(f"{len(logits_processors)} logits_processors lists for {B} prompts: pass one per prompt")
    penalty = [make_repetition_penalty(repetition_penalty)] if repetition_penalty else []
    processors = [penalty + list(logits_processors[b] if logits_processors else []) for b in range(B)]
    history = [mx.zeros((0,), mx.int32) for _ in range(B)]

    def sample(logits: mx.array) -> mx.array:
        if any(processors):
            rows = []
            for b in range(B):
                row = logits[b : b + 1]
                for proc in processors[b]:
                    row = proc(history[b], row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        tokens = sampler(logits.astype(mx.float32) if temperature > 0 else logits).astype(mx.int32)
        tokens = rank0_tokens(model, tokens)  # a tensor-parallel model's ranks must agree on every token
        if any(processors):
            for b in range(B):
                history[b] = mx.concatenate([history[b], tokens[b : b + 1]])
        return tokens

    tic = time.perf_counter()
    tokens = sample(runner.prefill(input_ids, runner.concat_features(features), attention_mask))
    mx.async_eval(tokens)
    eos = processor.tokenizer.eos_id
    detok = [_Detokenizer(processor) for _ in range(B)]
    done = [False] * B
    gen_tic = None
    for n in range(max_tokens):
        if n + 1 < max_tokens:  # queue the next step before reading this one
            next_tokens = sample(runner.step(tokens))
            mx.async_eval(next_tokens)
        current = tokens.tolist()
        if gen_tic is None:
            gen_tic = time.perf_counter()
            stats.prefill_time = gen_tic - tic
            stats.prefill_tps = B * stats.prompt_tokens / max(stats.prefill_time, 1e-9)
        stats.generation_tokens = n + 1
        stats.generation_time = time.perf_counter() - gen_tic
        stats.generation_tps = B * n / max(stats.generation_time, 1e-9) if n else 0.0
        stats.peak_memory_gb = runner.peak_memory_gb()
        for b, token in enumerate(current):
            if done[b]:
                continue
            if token == eos:
                done[b] = True
                yield GenerationChunk(detok[b].flush(), token, b, "stop", stats)
            elif n + 1 == max_tokens:
                done[b] = True
                text = detok[b].add(token)
                yield GenerationChunk(text + detok[b].flush(), token, b, "length", stats)
            else:
                yield GenerationChunk(detok[b].add(token), token, b, None, stats)
        if all(done):
            break
        tokens = next_tokens


def stream_generate(
    model: Any, processor: Processor, image: Union[ImageInput, ImageEmbedding], prompt: str, **kwargs
) -> Iterator[GenerationChunk]:
    """Stream the answer to one prompt about one image, chunk by chunk (same options as `generate`)."""
    if kwargs.get("logits_processors") is not None:
        kwargs["logits_processors"] = [kwargs["logits_processors"]]
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
    logits_processors: Optional[Sequence[Any]] = None,
) -> Union[GenerationResult, list[GenerationResult]]:
    """Answer a prompt about an image; lists of images and prompts run as one batch (a list back).

    `logits_processors`: mlx-lm-shaped `proc(tokens, logits) -> logits` applied after the repetition
    penalty; for a batch, one list per prompt (`grammar.grammar_processors` makes them for detect/segment).
    """
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
        logits_processors=logits_processors if batched or logits_processors is None else [logits_processors],
    )
    results = collect_results(processor, chunks, sizes)
    return results if batched else results[0]


def collect_results(
    processor: Processor, chunks: Iterable[GenerationChunk], image_sizes: Sequence[tuple[int, int]]
) -> list[GenerationResult]:
    """Gather a stream's chunks into one result per row (what `generate` returns); a caller that
    prints chunks as they come (the CLI) passes them through here to get the same results."""
    ids: list[list[int]] = [[] for _ in image_sizes]
    reasons = ["length"] * len(image_sizes)
    stats = GenerationStats()
    for chunk in chunks:
        stats = chunk.stats
        if chunk.finish_reason == "stop":
            reasons[chunk.row] = "stop"
        else:
            ids[chunk.row].append(chunk.token_id)
    return [GenerationResult(processor.decode(t), t, r, s, stats) for t, r, s in zip(ids, reasons, image_sizes)]


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
