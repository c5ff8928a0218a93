"""Fine-tune a PaliGemma checkpoint on JSON-lines data, in MLX: `python -m mlx_paligemma.finetune`.

    python -m mlx_paligemma.finetune --model google/paligemma-3b-pt-224 --data train.jsonl \\
        --val val.jsonl --out my-adapter --lora-rank 8

Each data line is `{"image": path, "prefix": ..., "suffix": ...}` (paths relative to the file).
The loss is the mean cross-entropy of the suffix tokens (and the closing eos), each predicted from
the position before it, under the model's own prefix-LM masks (`models.paligemma.prefix_lm_masks`):
image + prompt bidirectional, suffix causal, padding never attended -- exactly the attention of
inference, unlike training code that reuses the all-visible prefill mask and lets each suffix token
see the answer's future.

Gradients are sums over tokens divided by the token count of the whole (global) batch, so
gradient accumulation and `mx.distributed` data parallelism (run under `mlx.launch`; gradients
summed with `all_sum`) give the same update as one process on the combined batch.

Memory: the frozen base stays in the checkpoint's dtype (`--dtype` to change it; a 4/8-bit or
mixed checkpoint trains as QLoRA); on the CPU its layers compute in float32 (`cpu_layers`). LoRA
parameters and the optimiser state are float32. `--dry-run` prints the estimate (`memory.py`)
and stops before loading; gradient checkpointing switches itself on when the estimate needs it.
Each micro-batch is evaluated on its own (the graph never spans the accumulation or the
validation set), and batches are prepared (decode, resize, tokenise) on a thread ahead of use.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from PIL import Image

from .checkpoint import open_checkpoint, resolve_model_dir, stored_dtype
from .cli import ArgumentParser, run_main
from .config import load_config
from .dtypes import NAMES
from .errors import PaliGemmaError, ProcessorError
from .fsutil import atomic_path, atomic_write_text
from .models import Model
from .models.paligemma import prefix_lm_masks
from .processor import Processor, load_image, to_rgb

PROG = "mlx-paligemma finetune"
# Resume state lives in a subdirectory: checkpoint loaders read every *.safetensors at the top level.
STATE_DIR = "training_state"
STATE_FILE = f"{STATE_DIR}/state.json"
OPTIMIZER_FILE = f"{STATE_DIR}/optimizer.safetensors"
WEIGHTS_FILE = "model.safetensors"
# Files of the source checkpoint that a full fine-tune copies next to its weights.
_COPIED = ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_COPIED += ("preprocessor_config.json", "processor_config.json", "generation_config.json", "added_tokens.json")


class DataError(PaliGemmaError):
    """One or more lines of a data file cannot be used; the message lists every one of them."""


# --- options ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneOptions:
    """Every option of the command; defaults follow the published recipes for the 3B checkpoints
    (LoRA rank 8, alpha 16, lr 2e-5, vision tower frozen)."""

    model: str = ""
    data: str = ""
    out: str = ""
    val: Optional[str] = None
    lora_rank: Optional[int] = 8
    lora_alpha: float = 16.0
    lora_layers: str = "attn"
    full: bool = False
    train_vision: bool = False
    epochs: int = 1
    max_steps: Optional[int] = None
    time_budget: Optional[float] = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0
    val_every: int = 0
    resume: bool = False
    grad_checkpoint: bool = False
    loc_smoothing: float = 0.0
    order_loc_embeddings: bool = False
    pad_multiple: int = 8
    merge: bool = False
    merge_dtype: Optional[str] = None
    dtype: Optional[str] = None
    dry_run: bool = False
    image_cache: int = 1024
    force: bool = False
    quiet: bool = False

    def check(self) -> None:
        if not self.full and (self.lora_rank is None or self.lora_rank < 1):
            raise PaliGemmaError("--lora-rank: must be a positive integer (or pass --full)")
        if self.lora_layers not in ("attn", "all"):
            raise PaliGemmaError(f"--lora-layers: must be 'attn' or 'all', got {self.lora_layers!r}")
        for name in ("epochs", "batch_size", "grad_accum", "pad_multiple"):
            if getattr(self, name) < 1:
                raise PaliGemmaError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.time_budget is not None and self.time_budget <= 0:
            raise PaliGemmaError("--time-budget: must be positive (minutes)")
        if self.max_steps is not None and self.max_steps < 1:
            raise PaliGemmaError("--max-steps: must be at least 1")
        if self.lr <= 0:
            raise PaliGemmaError("--lr: must be positive")
        for name in ("dtype", "merge_dtype"):
            value = getattr(self, name)
            if value is not None and value not in NAMES:
                raise PaliGemmaError(f"--{name.replace('_', '-')}: must be one of {', '.join(NAMES)}, got {value!r}")
        if self.merge_dtype is not None and not self.merge:
            raise PaliGemmaError("--merge-dtype: only with --merge")
        if self.image_cache < 0:
            raise PaliGemmaError("--image-cache: must be >= 0")
        if self.warmup < 0 or self.save_every < 0 or self.val_every < 0 or self.clip < 0 or self.loc_smoothing < 0:
            raise PaliGemmaError("--warmup, --save-every, --val-every, --clip and --loc-smoothing must be >= 0")


# --- data ------------------------------------------------------------------------------------------------


@dataclass
class Example:
    image: Path
    prefix: str
    suffix: str
    line: int


def read_jsonl(path: str | os.PathLike, check_images: bool = True) -> list[Example]:
    """Parse a data file; every bad line (malformed JSON, missing or non-string field, unreadable
    image) is collected, and all of them are reported at once, with line numbers, in one DataError."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    examples, problems, checked = [], [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: malformed JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {n}: expected an object with image, prefix and suffix")
            continue
        missing = [k for k in ("image", "prefix", "suffix") if not isinstance(record.get(k), str)]
        if missing:
            problems.append(f"line {n}: missing or non-string field {', '.join(repr(k) for k in missing)}")
            continue
        image = (path.parent / record["image"]).expanduser()
        if check_images:
            if image not in checked:
                checked[image] = _image_problem(image)
            if checked[image]:
                problems.append(f"line {n}: {checked[image]}")
                continue
        examples.append(Example(image, record["prefix"], record["suffix"], n))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DataError(f"{path}: {len(problems)} bad line(s): " + "; ".join(shown))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _image_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return f"image {str(path)!r} not found"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"image {str(path)!r} is not a readable image ({type(e).__name__})"
    return None


class Batcher:
    """Examples -> padded numpy batches. Images are decoded and resized when first used and kept as
    uint8 in a cache of at most `image_cache` images (least recently used dropped first), so a data
    set larger than memory streams from disk while a small one is decoded once. Pure numpy and PIL:
    safe to call on the prefetch thread."""

    def __init__(
        self, examples: Sequence[Example], processor: Processor, pad_multiple: int = 8, image_cache: int = 1024
    ):
        self.examples = list(examples)
        self.processor = processor
        self.pad_multiple = pad_multiple
        self.image_cache = image_cache
        self._pixels: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._tokens: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def pixels_u8(self, path: Path) -> np.ndarray:
        arr = self._pixels.get(path)
        if arr is not None:
            self._pixels.move_to_end(path)
            return arr
        size = self.processor.image_size
        try:
            rgb = to_rgb(load_image(path)).resize((size, size), resample=Image.Resampling.BICUBIC)
        except ProcessorError as e:
            raise DataError(str(e)) from None
        arr = np.asarray(rgb, dtype=np.uint8)
        if self.image_cache:
            self._pixels[path] = arr
            while len(self._pixels) > self.image_cache:
                self._pixels.popitem(last=False)
        return arr

    def tokens(self, i: int) -> tuple[list[int], list[int]]:
        if i not in self._tokens:
            ex = self.examples[i]
            self._tokens[i] = self.processor.prompt_ids(ex.prefix, ex.suffix)
        return self._tokens[i]

    def batch(self, indices: Sequence[int], length: Optional[int] = None) -> dict[str, np.ndarray]:
        """Left-padded like the processor (to a multiple of `pad_multiple`, which bounds recompilation)."""
        p = self.processor
        rows = [self.tokens(i) for i in indices]
        L = length or max(len(ids) for ids, _ in rows)
        L = -(-L // self.pad_multiple) * self.pad_multiple
        n = len(rows)
        input_ids = np.full((n, L), p.tokenizer.pad_id, np.int32)
        attention_mask = np.zeros((n, L), np.int32)
        token_type_ids = np.zeros((n, L), np.int32)
        for r, (ids, types) in enumerate(rows):
            input_ids[r, L - len(ids) :] = ids
            attention_mask[r, L - len(ids) :] = 1
            token_type_ids[r, L - len(ids) :] = types
        u8 = np.stack([self.pixels_u8(self.examples[i].image) for i in indices]).astype(np.float32)
        x = u8.transpose(0, 3, 1, 2) * np.float32(p.rescale_factor)
        pixel_values = (x - p.image_mean[None]) / p.image_std[None]
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values.astype(np.float32),
        )

    def loss_span(self, indices: Sequence[int], length: int) -> int:
        """How many final positions hold every suffix token and the prefix position before the first
        (a multiple of `pad_multiple`, at most `length`): logits are computed there only."""
        suffix = max(sum(self.tokens(i)[1]) for i in indices) + 1
        return min(-(-suffix // self.pad_multiple) * self.pad_multiple, length)

    def max_length(self) -> int:
        return max(len(self.tokens(i)[0]) for i in range(len(self)))


class Prefetcher:
    """Runs `make(item)` for each item of `items` on a background thread, `depth` ahead of the consumer.

    Only numpy/PIL work belongs there (MLX streams belong to the thread that made them); the
    consumer turns the numpy arrays into MLX arrays. An exception on the thread is re-raised by
    the consumer at the item that failed; `close()` stops the thread.
    """

    _DONE = object()

    def __init__(self, items, make: Callable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items), make), daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items, make) -> None:
        try:
            for item in items:
                if not self._put((item, make(item), None)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put((None, None, e))
            return
        self._put(self._DONE)

    def __iter__(self):
        while True:
            got = self._queue.get()
            if got is self._DONE:
                return
            item, value, error = got
            if error is not None:
                raise error
            yield item, value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- loss ------------------------------------------------------------------------------------------------


# Eigen's rational approximation of tanh (float32 accurate to ~4e-7): MLX's CPU tanh is scalar and made
# GELU the most expensive op of a small model's training step.
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08)
_TANH_P += (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_GELU_C = math.sqrt(2 / math.pi)


def _fast_tanh(x: mx.array) -> mx.array:
    x = mx.clip(x, -7.90531110763549805, 7.90531110763549805)
    x2 = x * x
    p = _TANH_P[-1]
    for a in reversed(_TANH_P[:-1]):
        p = x2 * p + a
    q = _TANH_Q[-1]
    for b in reversed(_TANH_Q[:-1]):
        q = x2 * q + b
    return x * p / q


@mx.custom_function
def fast_gelu_approx(x: mx.array) -> mx.array:
    """`nn.gelu_approx` (tanh GELU) to within 1e-6, with an analytic gradient, using only multiply-adds."""
    return 0.5 * x * (1 + _fast_tanh(_GELU_C * (x + 0.044715 * x * x * x)))


@fast_gelu_approx.vjp
def _fast_gelu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    t = _fast_tanh(_GELU_C * (x + 0.044715 * x * x * x))
    d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)
    return (cotangent * d,)


@contextlib.contextmanager
def fast_activations():
    """While training, GELU runs as `fast_gelu_approx` (the models call `nn.gelu_approx` by name)."""
    original = nn.gelu_approx
    nn.gelu_approx = fast_gelu_approx
    try:
        yield
    finally:
        nn.gelu_approx = original


def forward(model: Model, batch: dict[str, mx.array], last: Optional[int] = None) -> mx.array:
    """Logits under the prefix-LM masks, with nothing that syncs (so it compiles); the data loader
    guarantees each row's image-token count (the check `Model.__call__` would do on the host).
    With `last`, logits of the last `last` positions only (left padding puts every suffix there)."""
    cfg = model.config
    h = model.embed_inputs(batch["input_ids"], model.encode_image(batch["pixel_values"]))
    masks = prefix_lm_masks(batch["attention_mask"], batch["token_type_ids"], cfg.text_config.sliding_window)
    hidden = model.language_model(h, masks)
    return model.logits(hidden if last is None else hidden[:, -last:])


def suffix_token_losses(
    logits: mx.array,
    batch: dict[str, mx.array],
    loc_range: Optional[tuple[int, int]] = None,
    loc_sigma: float = 0.0,
) -> tuple[mx.array, mx.array]:
    """Per-position losses (B, K-1) and their weights (1 on suffix tokens, 0 elsewhere), for logits of
    the last K positions.

    Position t-1 predicts token t; only suffix tokens (token_type_ids 1, not padding) count.
    With `loc_sigma` > 0 a `<loc>` target becomes a Gaussian over neighbouring bins (sigma in bins),
    so a near miss costs less than a far one and the loc tokens learn their order.
    """
    K = logits.shape[1]
    logits = logits[:, :-1].astype(mx.float32)
    targets = batch["input_ids"][:, -(K - 1) :]
    weights = (batch["token_type_ids"][:, -(K - 1) :] == 1) & (batch["attention_mask"][:, -(K - 1) :] == 1)
    weights = weights.astype(mx.float32)
    logz = mx.logsumexp(logits, axis=-1)
    nll = logz - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if loc_sigma > 0 and loc_range is not None:
        lo, hi = loc_range
        is_loc = (targets >= lo) & (targets < hi)
        soft = mx.take(_loc_targets(hi - lo, loc_sigma), mx.clip(targets - lo, 0, hi - lo - 1), axis=0)
        smooth = logz - (soft * logits[..., lo:hi]).sum(axis=-1)
        nll = mx.where(is_loc, smooth, nll)
    return nll, weights


@functools.lru_cache(maxsize=4)
def _loc_targets(bins: int, sigma: float) -> mx.array:
    """Row t: the Gaussian (sigma in bins) over bins centred on t, normalised."""
    j = np.arange(bins, dtype=np.float64)
    table = np.exp(-((j[None] - j[:, None]) ** 2) / (2 * sigma**2))
    return mx.array((table / table.sum(axis=1, keepdims=True)).astype(np.float32))


def suffix_loss(model: Model, batch: dict[str, mx.array], **kw: Any) -> mx.array:
    """Mean suffix-token cross-entropy of a batch (transformers' loss with `labels` from the processor)."""
    nll, w = suffix_token_losses(forward(model, batch), batch, **kw)
    return (nll * w).sum() / mx.maximum(w.sum(), 1)


# --- model setup -----------------------------------------------------------------------------------------


def loc_token_range(processor: Processor) -> Optional[tuple[int, int]]:
    """Ids of `<loc0000>`..`<loc1023>` when they are consecutive (as in every PaliGemma vocabulary)."""
    tok = processor.tokenizer
    first, last = tok.piece_to_id("<loc0000>"), tok.piece_to_id("<loc1023>")
    if last - first != 1023 or first <= 3:
        return None
    return first, last + 1


def order_loc_embeddings(model: Model, processor: Processor, scale: Optional[float] = None) -> None:
    """Give the 1024 `<loc>` embeddings sinusoidal features of their bin index (many frequencies,
    as in transformer position encodings), so neighbouring bins start close and far ones apart.

    Meant for a model trained from scratch: with the tied head, a hidden state then scores a bin
    and its neighbours alike, which is what detection answers need.
    """
    rng = loc_token_range(processor)
    if rng is None:
        raise PaliGemmaError("order_loc_embeddings: the vocabulary has no consecutive <loc0000>..<loc1023>")
    lo, hi = rng
    emb = model.language_model.embed_tokens.weight
    D = emb.shape[1]
    pos = np.arange(hi - lo, dtype=np.float64)[:, None]
    freqs = np.exp(np.linspace(np.log(2 * np.pi / 2048), np.log(2 * np.pi / 4), D // 2))[None]
    table = np.concatenate([np.sin(pos * freqs), np.cos(pos * freqs)], axis=1)
    if table.shape[1] < D:
        table = np.pad(table, ((0, 0), (0, D - table.shape[1])))
    if scale is None:
        scale = float(np.asarray(mx.sqrt(mx.mean(emb.astype(mx.float32) ** 2))))
    table = table / np.sqrt(np.mean(table**2)) * scale
    new = mx.concatenate([emb[:lo], mx.array(table, dtype=emb.dtype), emb[hi:]], axis=0)
    model.language_model.embed_tokens.weight = new


def set_trainable(model: Model, opts: FinetuneOptions) -> None:
    """Full: everything but the vision tower (unless --train-vision). LoRA: the adapters only (and the
    vision tower too with --train-vision)."""
    model.freeze()
    if opts.full:
        model.unfreeze()
        if not opts.train_vision:
            model.vision_tower.freeze()
    else:
        from .lora import apply_lora

        apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_layers)
        if opts.train_vision:
            model.vision_tower.unfreeze()


@contextlib.contextmanager
def grad_checkpointing(model: Model, enabled: bool = True):
    """Recompute each decoder and vision layer in the backward pass instead of storing its activations
    (as mlx-lm does, by wrapping the layer class's `__call__` in `mx.checkpoint`); restored on exit."""
    patched = []
    if enabled:
        for layers in (model.language_model.layers, model.vision_tower.encoder.layers):
            cls = type(layers[0])
            if any(c is cls for c, _ in patched):
                continue
            original = cls.__call__

            def checkpointed(self, *args, _fn=original, **kwargs):
                def inner(params, *a):
                    self.update(params)
                    return _fn(self, *a, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args)

            patched.append((cls, original))
            cls.__call__ = checkpointed
    try:
        yield
    finally:
        for cls, original in patched:
            cls.__call__ = original


# --- training --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float
    val_loss: Optional[float]
    seconds: float
    history: list[dict] = field(default_factory=list)


def _schedule(opts: FinetuneOptions, total: int):
    decay = max(total - opts.warmup, 1)
    cosine = optim.cosine_decay(opts.lr, decay, opts.lr * opts.min_lr_ratio)
    if opts.warmup == 0:
        return cosine
    return optim.join_schedules(
        [optim.linear_schedule(opts.lr / opts.warmup, opts.lr, opts.warmup), cosine], [opts.warmup]
    )


def _time_lr(opts: FinetuneOptions, step: int, fraction: float) -> float:
    """--time-budget: linear warm-up over steps, then cosine decay over the fraction of the remaining
    wall-clock time spent (rank 0's clock in a distributed run, so every rank uses the same rate)."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    floor, p = opts.lr * opts.min_lr_ratio, min(max(fraction, 0.0), 1.0)
    return floor + 0.5 * (opts.lr - floor) * (1 + math.cos(math.pi * p))


@functools.lru_cache(maxsize=2)
def _global_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: Optional[tuple] = None) -> list:
    """The epoch's global batches: a permutation seeded by (seed, epoch); the last short batch is dropped
    unless it is the only one. With `lengths`, each window of 64 batches is sorted by length before it is
    cut (similar lengths share a batch: less padding, fewer compiled shapes), then the batches are shuffled."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    count = max(n // batch_size, 1)
    if lengths is not None and count > 1:
        window = 64 * batch_size
        lens = np.asarray(lengths)
        for start in range(0, count * batch_size, window):
            chunk = perm[start : min(start + window, count * batch_size)]
            perm[start : start + len(chunk)] = chunk[np.argsort(lens[chunk], kind="stable")]
        batches = [perm[i * batch_size : (i + 1) * batch_size] for i in range(count)]
        return [batches[i] for i in rng.permutation(count)]
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def _copy_source_files(src: Path, dst: Path) -> None:
    for name in _COPIED:
        f = src / name
        if f.is_file() and not (dst / name).exists():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(f, tmp)


def write_checkpoint(model: Model, out: Path, src_dir: Path, dtype: Optional[str] = None) -> None:
    """The whole model as `model.safetensors` beside the source's config and tokenizer files: a checkpoint
    that `mp.load` (and the PyTorch backend) reads like any other. Float tensors are written in `dtype`
    (default: the source checkpoint's), whatever they were computed in. A model with no quantized layer
    from a quantized source (`--merge-dtype`) gets the source's config without its quantization entry."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or stored_dtype(open_checkpoint(src_dir))
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if not quantized and load_config(src_dir).quantization:
        config = json.loads((src_dir / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        config["torch_dtype"] = dtype
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    _copy_source_files(src_dir, out)
    target = getattr(mx, dtype)
    weights = {
        k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in tree_flatten(model.parameters())
    }
    with atomic_path(out / WEIGHTS_FILE, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})


def save_weights(model: Model, out: Path, opts: FinetuneOptions, src_dir: Path) -> None:
    """Full fine-tune: a complete checkpoint (`write_checkpoint`). LoRA: the adapters alone
    (`adapters.safetensors` + `adapter_config.json`)."""
    if opts.full:
        write_checkpoint(model, out, src_dir, opts.dtype)
    else:
        from .lora import save_adapters

        save_adapters(
            model,
            out,
            base_model=opts.model,
            rank=opts.lora_rank,
            alpha=opts.lora_alpha,
            layers=opts.lora_layers,
            train_vision=opts.train_vision,
        )


def _save_training_state(
    out: Path, optimizer: optim.Optimizer, step: int, opts: FinetuneOptions, elapsed: float = 0.0
) -> None:
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    flat = dict(tree_flatten(optimizer.state))
    with atomic_path(out / OPTIMIZER_FILE, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), flat)
    atomic_write_text(
        out / STATE_FILE, json.dumps({"step": step, "elapsed": elapsed, "options": asdict(opts)}, indent=2) + "\n"
    )


def _load_training_state(
    out: Path, model: Model, optimizer: optim.Optimizer, opts: FinetuneOptions
) -> tuple[int, float]:
    state_file = out / STATE_FILE
    if not state_file.is_file():
        raise PaliGemmaError(f"--resume: {out} has no {STATE_FILE} (nothing saved to resume from)")
    state = json.loads(state_file.read_text())
    step, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
    if opts.full:
        model.load_weights(str(out / WEIGHTS_FILE), strict=False)
    else:
        from .lora import ADAPTER_WEIGHTS

        model.load_weights(list(mx.load(str(out / ADAPTER_WEIGHTS)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(out / OPTIMIZER_FILE)).items()))
    mx.eval(model.parameters(), optimizer.state)
    return step, elapsed


def load_base(src_dir: Path, opts: FinetuneOptions) -> Model:
    """The model to train. LoRA: the frozen base in `--dtype` (default: the checkpoint's; quantized
    layers stay quantized), on the CPU computing in float32 with its linear and embedding weights
    kept in that dtype (`load_model(float32_compute=True)`). Full: every weight in `--dtype`
    (default float32, what AdamW needs to make small updates)."""
    from .load import load_model, on_cpu

    if opts.full:
        if load_config(src_dir).quantization:
            raise PaliGemmaError(
                f"--full: {src_dir} is quantized and its weights cannot be trained; use LoRA (QLoRA) or the float "
                f"checkpoint"
            )
        return load_model(src_dir, opts.dtype or "float32")
    return load_model(src_dir, opts.dtype, float32_compute=on_cpu())


def plan(opts: FinetuneOptions, world: int = 1, examples: Optional[list[Example]] = None) -> tuple[Any, int, int]:
    """(memory estimate of one step, memory available, sequence length) from config.json, the tensor
    index and the data's token counts: nothing of the weights is read."""
    from .load import on_cpu
    from .memory import available_memory, estimate

    src_dir = resolve_model_dir(opts.model)
    config = load_config(src_dir)
    processor = Processor.from_dir(src_dir, config)
    examples = examples if examples is not None else read_jsonl(opts.data)
    length = Batcher(examples, processor, opts.pad_multiple).max_length()
    length = -(-length // opts.pad_multiple) * opts.pad_multiple
    stored = stored_dtype(open_checkpoint(src_dir))
    dtype = opts.dtype or ("float32" if opts.full else stored)
    est = estimate(
        config,
        mode="full" if opts.full else "lora",
        dtype=dtype,
        quantization=config.quantization if not opts.full else None,
        batch=max(opts.batch_size // world, 1),
        text_tokens=max(length - config.num_image_tokens, 1),
        lora_rank=opts.lora_rank or 8,
        lora_layers=opts.lora_layers,
        grad_checkpoint=opts.grad_checkpoint,
        compute_dtype="float32" if on_cpu() else dtype,
    )
    return est, available_memory(), length


def _choose_grad_checkpoint(
    opts: FinetuneOptions, world: int, examples: list[Example], say: Callable[[str], None]
) -> None:
    """Switch gradient checkpointing on when the estimate without it does not fit (one line says so)."""
    from dataclasses import replace

    from .memory import GB, fits_line

    est, available, _ = plan(opts, world, examples)
    if not opts.grad_checkpoint and est.total > available:
        with_ckpt, _, _ = plan(replace(opts, grad_checkpoint=True), world, examples)
        opts.grad_checkpoint = True
        say(
            f"gradient checkpointing on: the step needs about {est.total / GB:.1f} GB without it, "
            f"{with_ckpt.total / GB:.1f} GB with it, of {available / GB:.1f} GB"
        )
        est = with_ckpt
    if est.total > available:
        say(fits_line(est.total, available))


def finetune(
    opts: FinetuneOptions,
    callback: Optional[Callable[[int, Model, Processor, dict], None]] = None,
) -> TrainResult:
    """Train as `opts` says; returns where the result is. `callback(step, model, processor, info)` runs
    after every optimizer step on rank 0 (used by tools/train_demo_model.py for timed evaluations)."""
    with fast_activations(), contextlib.ExitStack() as stack:
        return _train(opts, callback, stack)


def _train(opts: FinetuneOptions, callback: Optional[Callable], stack: contextlib.ExitStack) -> TrainResult:
    opts.check()
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if opts.batch_size % world:
        raise PaliGemmaError(f"--batch-size {opts.batch_size} must be divisible by the {world} processes")
    out = Path(opts.out).expanduser()
    if out.exists() and any(out.iterdir()) and not (opts.resume or opts.force):
        raise PaliGemmaError(f"{out}: exists and is not empty (pass --resume to continue, --force to overwrite)")

    src_dir = resolve_model_dir(opts.model)
    train_examples = read_jsonl(opts.data)
    if rank == 0 and not opts.grad_checkpoint:
        say = lambda line: print(f"{PROG}: {line}", file=sys.stderr)  # noqa: E731
        _choose_grad_checkpoint(opts, world, train_examples, say)
    if world > 1:  # every rank checkpoints alike, as rank 0 decided
        opts.grad_checkpoint = bool(mx.distributed.all_sum(mx.array(float(opts.grad_checkpoint)), group=group) > 0)
    model = load_base(src_dir, opts)
    processor = Processor.from_dir(src_dir, model.config)
    train = Batcher(train_examples, processor, opts.pad_multiple, opts.image_cache)
    val = Batcher(read_jsonl(opts.val), processor, opts.pad_multiple, opts.image_cache) if opts.val else None
    if opts.order_loc_embeddings and not opts.resume:
        order_loc_embeddings(model, processor)
    set_trainable(model, opts)
    stack.enter_context(grad_checkpointing(model, opts.grad_checkpoint))
    model.train()

    steps_per_epoch = math.ceil(max(len(train) // opts.batch_size, 1) / opts.grad_accum)
    total = opts.max_steps or steps_per_epoch * opts.epochs
    budget = opts.time_budget * 60 if opts.time_budget else None
    if budget is not None:
        total = opts.max_steps or 10**9
    # With a time budget the rate is set before each step (it depends on the clock, not on the step).
    schedule = _schedule(opts, total) if budget is None else opts.lr
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=opts.weight_decay)
    optimizer.init(model.trainable_parameters())
    start, elapsed0 = 0, 0.0
    if opts.resume and (out / STATE_FILE).is_file():
        start, elapsed0 = _load_training_state(out, model, optimizer, opts)
    loss_kw = dict(loc_range=loc_token_range(processor), loc_sigma=opts.loc_smoothing)

    def loss_sum(batch: dict[str, mx.array], last: Optional[int] = None) -> tuple[mx.array, mx.array]:
        nll, w = suffix_token_losses(forward(model, batch, last), batch, **loss_kw)
        return (nll * w).sum(), w.sum()

    value_and_grad = nn.value_and_grad(model, loss_sum)

    # nn.value_and_grad swaps traced parameters into the model: the model's state is an input and an
    # output of the compiled function, as in mlx-lm's trainer. `last` (a Python int) is a constant.
    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def compiled_grads(batch: dict[str, mx.array], last: int):
        (loss, ntok), grads = value_and_grad(batch, last)
        return loss, ntok, grads

    update_state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=update_state, outputs=update_state)
    def apply_update(grads: dict, ntok: mx.array) -> None:
        """Sums of per-token gradients / the global token count, clipped, then one AdamW step."""
        denom = mx.maximum(ntok, 1)
        grads = tree_map(lambda g: g / denom, grads)
        if opts.clip > 0:
            grads, _ = optim.clip_grad_norm(grads, opts.clip)
        optimizer.update(model, grads)

    # The micro-batches of optimizer step s are global batches s*grad_accum ... in epoch order.
    lengths = tuple(len(train.tokens(i)[0]) for i in range(len(train)))
    per_epoch = len(_global_batches(len(train), opts.batch_size, opts.seed, 0, lengths))

    def micro_batches(step: int):
        for k in range(opts.grad_accum):
            epoch, i = divmod(step * opts.grad_accum + k, per_epoch)
            idx = _global_batches(len(train), opts.batch_size, opts.seed, epoch, lengths)[i]
            per = len(idx) // world
            yield idx[rank * per : (rank + 1) * per]

    def all_micro_batches():
        for step in range(start, total):
            yield from micro_batches(step)

    def evaluate(b: Batcher) -> float:
        """Each batch is evaluated before the next is built: the graph never spans the validation set."""
        tot, cnt = mx.array(0.0), mx.array(0.0)
        for s in range(0, len(b), max(opts.batch_size // world, 1) * world):
            idx = np.arange(s, min(s + opts.batch_size, len(b)))[rank::world]
            if len(idx) == 0:
                continue
            nb = b.batch(idx)
            ls, n = loss_sum({k: mx.array(v) for k, v in nb.items()}, b.loss_span(idx, nb["input_ids"].shape[1]))
            tot, cnt = tot + ls, cnt + n
            mx.eval(tot, cnt)
        if world > 1:
            tot, cnt = mx.distributed.all_sum(tot, group=group), mx.distributed.all_sum(cnt, group=group)
        return float(tot / mx.maximum(cnt, 1))

    bar = None
    if rank == 0 and not opts.quiet:
        from tqdm import tqdm

        bar_total = None if budget is not None and opts.max_steps is None else total
        bar = tqdm(total=bar_total, initial=start, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True)
    history: list[dict] = []
    t0, tokens, last_loss, val_loss = time.perf_counter() - elapsed0, 0, float("nan"), None
    t_start, warm_end = time.perf_counter(), None
    ema, done = None, start
    # Batches are built (images decoded, tokens padded: numpy only) on a thread, two micro-batches ahead.
    prefetch = Prefetcher(all_micro_batches(), train.batch, depth=2)
    stack.callback(prefetch.close)
    upcoming = iter(prefetch)
    for step in range(start, total):
        if budget is not None:
            # Rank 0's clock decides the learning rate and the end, for every rank alike.
            now = time.perf_counter() - t0
            if step >= opts.warmup and warm_end is None:
                warm_end = now
            frac = (now - (warm_end or now)) / max(budget - (warm_end or now), 1e-9)
            shared = mx.array([frac, float(now >= budget)]) * (1.0 if rank == 0 else 0.0)
            if world > 1:
                shared = mx.distributed.all_sum(shared, group=group)
            frac, out_of_time = float(shared[0]), bool(shared[1] > 0)
            if out_of_time:
                break
            optimizer.learning_rate = mx.array(_time_lr(opts, step, frac))
        loss_acc, ntok_acc, grads_acc = mx.array(0.0), mx.array(0.0), None
        for _ in range(opts.grad_accum):
            idx, nb = next(upcoming)
            batch = {k: mx.array(v) for k, v in nb.items()}
            loss, ntok, grads = compiled_grads(batch, train.loss_span(idx, nb["input_ids"].shape[1]))
            grads_acc = grads if grads_acc is None else tree_map(mx.add, grads_acc, grads)
            loss_acc, ntok_acc = loss_acc + loss, ntok_acc + ntok
            if opts.grad_accum > 1:  # as mlx-lm's trainer: one micro-batch's graph at a time
                mx.eval(grads_acc, loss_acc, ntok_acc)
            tokens += int(batch["attention_mask"].size)
        if world > 1:
            grads_acc = tree_map(lambda g: mx.distributed.all_sum(g, group=group), grads_acc)
            loss_acc = mx.distributed.all_sum(loss_acc, group=group)
            ntok_acc = mx.distributed.all_sum(ntok_acc, group=group)
        apply_update(grads_acc, ntok_acc)
        mx.eval(model.trainable_parameters(), optimizer.state, loss_acc)
        last_loss = float(loss_acc / mx.maximum(ntok_acc, 1))
        ema = last_loss if ema is None else 0.95 * ema + 0.05 * last_loss
        done = step + 1
        if bar is not None:
            rate = tokens * world / max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
        info = {"step": done, "loss": last_loss, "loss_ema": ema, "lr": float(optimizer.learning_rate)}
        info["elapsed"] = time.perf_counter() - t0
        end_of_epoch = done % steps_per_epoch == 0
        if val is not None and ((opts.val_every and done % opts.val_every == 0) or end_of_epoch):
            model.eval()
            val_loss = evaluate(val)
            model.train()
            info["val_loss"] = val_loss
            if bar is not None:
                bar.write(f"step {done}: train loss {ema:.4f}, val loss {val_loss:.4f}")
        history.append(info)
        if opts.save_every and done % opts.save_every == 0 and done < total and rank == 0:
            save_weights(model, out, opts, src_dir)
            _save_training_state(out, optimizer, done, opts, time.perf_counter() - t0)
        if callback is not None and rank == 0:
            callback(done, model, processor, info)
    if bar is not None:
        bar.close()
    if val is not None and (not history or "val_loss" not in history[-1]):
        model.eval()
        val_loss = evaluate(val)
        if history:
            history[-1]["val_loss"] = val_loss
    if rank == 0:
        save_weights(model, out, opts, src_dir)
        _save_training_state(out, optimizer, done, opts, time.perf_counter() - t0)
        if opts.merge and not opts.full:
            from .lora import dequantize_model, merge_lora

            if opts.merge_dtype is not None:  # a float checkpoint: dequantize first, fuse in float
                dequantize_model(model)
            merge_lora(model)  # else a quantized base layer is re-quantized with its own settings
            write_checkpoint(model, out / "merged", src_dir, opts.merge_dtype)
    return TrainResult(out, done, last_loss, val_loss, time.perf_counter() - t0, history)


# --- CLI -------------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    d = FinetuneOptions()
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory, hub repo id, or 'demo'")
    p.add_argument("--data", required=True, help="training JSON lines: {image, prefix, suffix} (paths relative)")
    p.add_argument("--val", help="validation JSON lines; its loss is reported every epoch")
    p.add_argument("--out", required=True, help="output directory (adapters, or a full checkpoint with --full)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank (default 8)")
    mode.add_argument("--full", action="store_true", help="train all weights (vision tower too with --train-vision)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scale numerator (default 16)")
    p.add_argument("--lora-layers", choices=("attn", "all"), default=d.lora_layers, help="attention or all linears")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower (frozen by default)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="train for this wall-clock time: warm-up, then cosine decay over the remaining time",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split across processes)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default 2e-5)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient norm clip (0: off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="save (and make resumable) every N steps")
    p.add_argument("--val-every", type=int, default=d.val_every, help="validation loss every N steps too")
    p.add_argument("--resume", action="store_true", help="continue from the last save in --out")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute layers in backward: less memory (switched on by itself when the estimate needs it)",
    )
    p.add_argument(
        "--dtype",
        choices=NAMES,
        default=None,
        help="dtype of the frozen base (default: the checkpoint's; on the CPU it computes in float32 either way). "
        "--full: of the trained weights (default float32)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the memory estimate and stop (reads no weights)")
    p.add_argument(
        "--image-cache",
        type=int,
        default=d.image_cache,
        help="decoded images kept in memory (default 1024; others are decoded again when used)",
    )
    p.add_argument(
        "--loc-smoothing",
        type=float,
        default=d.loc_smoothing,
        metavar="SIGMA",
        help="Gaussian label smoothing over neighbouring <loc> bins (sigma in bins; helps detection from scratch)",
    )
    p.add_argument(
        "--order-loc-embeddings",
        action="store_true",
        help="initialise the <loc> embeddings with sinusoidal features of their bin (for models trained from scratch)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="LoRA: also write OUT/merged, a standalone checkpoint with the adapters folded in (in the base's "
        "dtype; on a quantized base each adapted layer is re-quantized with its own bits)",
    )
    p.add_argument(
        "--merge-dtype",
        choices=NAMES,
        default=None,
        help="with --merge: write OUT/merged as a float checkpoint in this dtype (a quantized base is dequantized)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(FinetuneOptions) if hasattr(args, f.name)}
    opts = FinetuneOptions(**values)

    def body() -> int:
        if opts.dry_run:
            opts.check()
            est, available, length = plan(opts, mx.distributed.init().size())
            what = f"{'full' if opts.full else 'LoRA'} fine-tuning, batch {opts.batch_size}, sequence {length}"
            print(est.report(available, what))
            return 0
        result = finetune(opts)
        if mx.distributed.init().rank() == 0:
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(f"{result.out}: {result.steps} steps, train loss {result.train_loss:.4f}{val}")
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
