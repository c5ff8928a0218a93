"""The training loop: loading the base, the memory plan, trainable parameters, schedules, steps."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from ..checkpoint import open_checkpoint, resolve_model_dir, stored_dtype
from ..config import load_config
from ..errors import PaliGemmaError
from ..memory import checkpointed_layers
from ..models import Model
from ..processor import Processor
from .data import Batcher, Example, Prefetcher, _global_batches, read_jsonl
from .loss import (
    forward,
    loc_token_range,
    order_loc_embeddings,
    suffix_token_losses,
)
from .options import PROG, FinetuneOptions, TrainResult
from .state import (
    STATE_FILE,
    _load_training_state,
    _save_training_state,
    save_weights,
    write_checkpoint,
)


def set_trainable(model: Model, opts: FinetuneOptions) -> None:
    """Full: everything but the vision tower (unless --train-vision). LoRA: the adapters only (and the
    vision tower too with --train-vision)."""
    model.freeze()
    if opts.full:
        model.unfreeze()
        if not opts.train_vision:
            model.vision_tower.freeze()
    else:
        from ..lora import apply_lora

        apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_layers)
        if opts.train_vision:
            model.vision_tower.unfreeze()


@contextlib.contextmanager
def grad_checkpointing(model: Model, enabled: Union[bool, int] = True):
    """Recompute layers in the backward pass instead of storing their activations (as mlx-lm does, by
    wrapping the layer class's `__call__` in `mx.checkpoint`); restored on exit. `enabled`: True for every
    decoder and vision layer, an int k for the first k decoder layers only (each one spared saves about
    one layer's activations and costs one more layer forward per step)."""
    decoder = model.language_model.layers
    count = checkpointed_layers(enabled, len(decoder))
    chosen = list(decoder[:count])
    if count == len(decoder):
        chosen += list(model.vision_tower.encoder.layers)
    chosen_ids = {id(layer) for layer in chosen}
    patched = []
    for layer in chosen:
        cls = type(layer)
        if any(c is cls for c, _ in patched):
            continue
        original = cls.__call__

        def maybe_checkpointed(self, *args, _fn=original, **kwargs):
            if id(self) not in chosen_ids:
                return _fn(self, *args, **kwargs)

            def inner(params, *a):
                self.update(params)
                return _fn(self, *a, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args)

        patched.append((cls, original))
        cls.__call__ = maybe_checkpointed
    try:
        yield
    finally:
        for cls, original in patched:
            cls.__call__ = original


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


def load_base(src_dir: Path, opts: FinetuneOptions) -> Model:
    """The model to train. LoRA: the frozen base in `--dtype` (default: the checkpoint's; quantized
    layers stay quantized), on the CPU computing in float32 with its linear and embedding weights
    kept in that dtype (`load_model(float32_compute=True)`). Full: every weight in `--dtype`
    (default float32, what AdamW needs to make small updates)."""
    from ..load import load_model, on_cpu

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
    from ..load import on_cpu
    from ..memory import available_memory, estimate

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
    """Switch gradient checkpointing on when the estimate without it does not fit: for the fewest decoder
    layers that make it fit (each layer recomputed costs time), else the leanest choice; one line says so."""
    from dataclasses import replace

    from ..memory import GB, fits_line

    est, available, _ = plan(opts, world, examples)
    if not opts.grad_checkpoint and est.total > available:
        num_layers = load_config(resolve_model_dir(opts.model)).text_config.num_hidden_layers
        tried = []
        for count in [*range(1, num_layers), True]:
            tried.append((count, plan(replace(opts, grad_checkpoint=count), world, examples)[0]))
            if tried[-1][1].total <= available:
                break
        chosen, with_ckpt = tried[-1] if tried[-1][1].total <= available else min(tried, key=lambda t: t[1].total)
        opts.grad_checkpoint = chosen
        which = "every layer" if chosen is True else f"{chosen} of {num_layers} decoder layers"
        say(
            f"gradient checkpointing on for {which}: the step needs about {est.total / GB:.1f} GB without it, "
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
    with contextlib.ExitStack() as stack:
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
    if world > 1:  # every rank checkpoints alike, as rank 0 decided (the others pass 0)
        layers = load_config(src_dir).text_config.num_hidden_layers
        mine = checkpointed_layers(opts.grad_checkpoint, layers) if rank == 0 else 0
        count = int(mx.distributed.all_sum(mx.array(mine), group=group).item())
        opts.grad_checkpoint = True if count >= layers else count
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
            from ..lora import dequantize_model, merge_lora

            quantized = load_config(src_dir).quantization
            if opts.merge_dtype is not None:  # a float checkpoint: dequantize first, fuse in float
                dequantize_model(model)
            merge_lora(model)  # else a quantized base layer is re-quantized with its own settings
            write_checkpoint(model, out / "merged", src_dir, opts.merge_dtype)
            if not opts.quiet:
                if quantized and opts.merge_dtype is None:
                    what = "each adapted layer re-quantized with its base layer's bits and group size"
                elif quantized:
                    what = f"the quantized base dequantized to {opts.merge_dtype}, adapters added in float"
                else:
                    what = f"adapters folded into the {opts.merge_dtype or 'base checkpoint'}'s weights"
                print(f"{PROG}: wrote {out / 'merged'}: {what}", file=sys.stderr)
    return TrainResult(out, done, last_loss, val_loss, time.perf_counter() - t0, history)
