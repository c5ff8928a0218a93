"""Build and train the demo model that ships in `mlx_paligemma/demo/`, from scratch, on the shapes task.

    LD_PRELOAD=/work/venv/lib/libmkl_rt.so.3 python -m tools.train_demo_model WORK_DIR --minutes 180 \\
        --part-minutes 60                  # first part; then the same command with --resume, twice
    python -m tools.train_demo_model WORK_DIR --ship mlx_paligemma/demo

Steps:
1. `WORK/init`: a small PaliGemma-architecture checkpoint with random weights (size from the architecture
   options) and its own sentencepiece tokenizer in the PaliGemma layout (`<image>`, `<loc0000>`..`<loc1023>`,
   `<seg000>`..`<seg127>`);
2. training, full (vision tower included), on scenes generated afresh for every step
   (`tools/demo_stream.py`: reproducible from `--seed`, a background thread draws them), with the loss and
   compiled step of `mlx_paligemma.finetune` (prefix-LM masks, ordered `<loc>` embeddings, Gaussian `<loc>`
   label smoothing); AdamW, linear warm-up then cosine decay over the whole schedule (`--minutes` of
   training, or `--steps`), which may run in parts (`--part-minutes`, then `--resume`);
3. a snapshot (weights, optimiser state, step, elapsed time, options) every `--save-minutes` in
   `WORK/checkpoints/step-NNNNNNN`, written whole before `WORK/checkpoints/LATEST` names it (a crash never
   leaves a half snapshot), older snapshots removed;
4. the learning curve: every `--eval-minutes` and at the end of each part, one JSON line in `WORK/log.txt`
   (minutes, step, examples seen, loss, learning rate, steps/s, and every `benchmarks.eval_shapes` score on
   `--eval-images` held-out scenes: caption, count, colour, detection, absent shape, multi-class);
5. `--ship DEST`: the latest snapshot into the package, stored as `--ship-dtype` (bfloat16 by default:
   twice the parameters of float32 under the 20 MB limit; the loader computes float32 on a CPU), the example
   images, the doctor's reference logits, and the generated part of DEST/README.md (evaluation table on
   both backends and 8-bit, learning curve).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from mlx_paligemma.cli import ArgumentParser, run_main
from mlx_paligemma.errors import PaliGemmaError
from mlx_paligemma.fsutil import atomic_dir, atomic_path, atomic_write_text
from tools import shapes
from tools.demo_stream import DEFAULT_MIX, Prefetcher, SceneStream, describe_mix, parse_mix
from tools.make_tiny_checkpoint import BOS_ID, EOS_ID, PAD_ID, build_sentencepiece_model, write_processor_files

PROG = "python -m tools.train_demo_model"
VOCAB_MULTIPLE = 64
SIZE_LIMIT = 20 * 1024 * 1024  # the shipped model.safetensors (tests/test_demo_model.py checks it)


@dataclass
class Arch:
    """The model's size. Defaults: the retrain's choice (mlx_paligemma/demo/README.md, "Plan"): the first
    model's widths at 112 px (49 image tokens), 4.6 M parameters (8.8 MiB stored in 16 bits)."""

    image_size: int = 112
    patch_size: int = 16
    vision_width: int = 192
    vision_layers: int = 4
    vision_mlp: int = 768
    vision_heads: int = 4
    text_width: int = 256
    text_layers: int = 4
    text_mlp: int = 512
    text_heads: int = 4
    kv_heads: int = 1
    head_dim: int = 64

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _corpus() -> list[str]:
    """Every prompt and answer word of the shapes task, plus a little general text for byte-level fallback."""
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        scene = shapes.make_scene(rng)
        for prefix, suffix in shapes.examples_for(scene, rng, absent_detect=1.0):
            lines.append(prefix)
            lines.append(re.sub(r"<loc\d{4}>", "", suffix))
    for kind in shapes.SHAPES:
        lines.append(f"detect {kind}")
    lines += ["caption en", "answer en what is in the image?", "a photo of a cat", "how many"]
    return lines


def build_sentencepiece(pieces: int = 160) -> bytes:
    """A sentencepiece model with Gemma's conventions and the PaliGemma special tokens (as
    tools/make_tiny_checkpoint.py builds them), trained on the shapes vocabulary so that every task
    word is one or two pieces (the new shapes of tools/shapes.py are not in it: they are for teaching)."""
    return build_sentencepiece_model(_corpus(), pieces)


def build_init(out_dir: str | Path, arch: Optional[Arch] = None, seed: int = 0) -> Path:
    """A random-weight checkpoint of `arch` (default: `Arch()`) with the demo tokenizer (MLX's default
    initialisation)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from transformers import PaliGemmaConfig

    from mlx_paligemma.config import load_config
    from mlx_paligemma.models import Model

    arch = arch or Arch()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        image_token = write_processor_files(tmp, arch.image_size, arch.image_tokens, build_sentencepiece())
        vocab = math.ceil((image_token + 1) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        text = dict(
            model_type="gemma",
            hidden_size=arch.text_width,
            intermediate_size=arch.text_mlp,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            num_key_value_heads=arch.kv_heads,
            head_dim=arch.head_dim,
            vocab_size=vocab,
            dtype="float32",
        )
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=arch.vision_width,
            intermediate_size=arch.vision_mlp,
            num_hidden_layers=arch.vision_layers,
            num_attention_heads=arch.vision_heads,
            patch_size=arch.patch_size,
            image_size=arch.image_size,
            layer_norm_eps=1e-6,
            vision_use_head=False,
            dtype="float32",
        )
        config = PaliGemmaConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=arch.text_width,
            image_token_index=image_token,
            vocab_size=vocab,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            dtype="float32",
            architectures=["PaliGemmaForConditionalGeneration"],
        )
        config.save_pretrained(tmp)
        mx.random.seed(seed)
        model = Model(load_config(tmp))
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out_dir


def parameter_count(arch: Arch) -> int:
    """Parameters of `arch` (tokenizer of the demo: the vocabulary is the same for every size)."""
    import tempfile

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_paligemma.config import load_config
    from mlx_paligemma.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        build_init(Path(tmp) / "init", arch)
        model = Model(load_config(Path(tmp) / "init"))
        return sum(v.size for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array))


# --- training --------------------------------------------------------------------------------------------


_DEFAULT_SHAPES, _DEFAULT_COLOURS = ",".join(shapes.SHAPES), ",".join(shapes.COLOURS)


@dataclass
class TrainOptions:
    """The schedule and the data: fixed by the first part of a run, reused by every `--resume`."""

    minutes: Optional[float] = 170.0
    steps: Optional[int] = None
    batch_size: int = 32
    lr: float = 5e-4
    vision_lr_scale: float = 1.0
    min_lr_ratio: float = 0.05
    warmup: int = 300
    weight_decay: float = 0.01
    clip: float = 1.0
    loc_smoothing: float = 4.0
    pad_multiple: int = 8
    seed: int = 0
    mix: str = ",".join(f"{k}={v:g}" for k, v in DEFAULT_MIX.items())
    absent_from: float = 0.3
    shapes: str = _DEFAULT_SHAPES
    colours: str = _DEFAULT_COLOURS


@dataclass
class PartOptions:
    """How this invocation runs: may differ from part to part."""

    part_minutes: Optional[float] = None
    stop_after_steps: Optional[int] = None
    save_minutes: float = 5.0
    eval_minutes: float = 12.0
    eval_images: int = 60
    prefetch: bool = True
    quiet: bool = False


ARCH_HELP = {
    "image_size": "input pixels per side (image tokens: (size / patch)^2)",
    "patch_size": "SigLIP patch side in pixels",
    "vision_width": "SigLIP hidden size",
    "vision_layers": "SigLIP layers",
    "vision_mlp": "SigLIP MLP size",
    "vision_heads": "SigLIP attention heads",
    "text_width": "Gemma hidden size (also the projector's output)",
    "text_layers": "Gemma layers",
    "text_mlp": "Gemma MLP size",
    "text_heads": "Gemma attention heads",
    "kv_heads": "Gemma key/value heads",
    "head_dim": "Gemma head size",
}
CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
# Beside the weights, in a subdirectory: checkpoint loaders read every *.safetensors at the top level.
OPTIMIZER = "training_state/optimizer.safetensors"
STATE = "training_state/state.json"


def latest_snapshot(work: Path) -> Optional[Path]:
    pointer = work / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = work / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_snapshot(work: Path, model, optimizer, state: dict) -> Path:
    """Weights + optimiser state + state.json into a new directory (complete or absent), then LATEST
    names it, then older snapshots go."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_paligemma.finetune import write_checkpoint

    root = work / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:07d}"
    with atomic_dir(root / name, replace=True) as tmp:
        write_checkpoint(model, tmp, work / "init")
        (tmp / OPTIMIZER).parent.mkdir()
        mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
    atomic_write_text(root / LATEST, name + "\n")
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def lr_at(opts: TrainOptions, step: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `lr` to `lr * min_lr_ratio` over the schedule."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    floor = opts.lr * opts.min_lr_ratio
    return floor + 0.5 * (opts.lr - floor) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def log_eval(work: Path, model, processor, record: dict, images: int, vocab: shapes.Vocabulary) -> dict:
    """Score the model on held-out scenes and append one JSON line to WORK/log.txt."""
    from benchmarks.eval_shapes import evaluate

    t = time.perf_counter()
    model.eval()
    metrics = evaluate(model, processor, images, vocab=vocab)
    model.train()
    record = dict(record)
    # NaN (a kind absent from the scenes) is written as null: the log stays strict JSON
    record.update({k: round(v, 4) if v == v else None for k, v in metrics.items() if isinstance(v, float)})
    record["eval_seconds"] = round(time.perf_counter() - t, 1)
    with open(work / "log.txt", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"eval: {json.dumps(record)}", file=sys.stderr, flush=True)
    return record


def make_optimizer(opts: TrainOptions, lr: float):
    """AdamW; with `vision_lr_scale` != 1, one AdamW for the vision tower at that multiple of the rate and one
    for the rest (`mlx.optimizers.MultiOptimizer`). Adam's steps do not scale with the gradient, so a
    separate rate is the way to move one part of the model faster."""
    import mlx.optimizers as optim

    if opts.vision_lr_scale == 1.0:
        return optim.AdamW(learning_rate=lr, weight_decay=opts.weight_decay)
    vision = optim.AdamW(learning_rate=lr * opts.vision_lr_scale, weight_decay=opts.weight_decay)
    rest = optim.AdamW(learning_rate=lr, weight_decay=opts.weight_decay)
    return optim.MultiOptimizer([vision, rest], [lambda path, _: path.startswith("vision_tower.")])


def set_learning_rate(optimizer, opts: TrainOptions, lr: float) -> None:
    """The schedule's rate for this step (the vision tower's scaled with a MultiOptimizer), as arrays: the
    compiled update reads them from the optimiser's state."""
    import mlx.core as mx

    parts = getattr(optimizer, "optimizers", None)
    if parts is None:
        optimizer.learning_rate = mx.array(lr)
    else:
        parts[0].learning_rate = mx.array(lr * opts.vision_lr_scale)
        parts[1].learning_rate = mx.array(lr)


def make_step(model, optimizer, processor, opts: TrainOptions):
    """`step(numpy_batch) -> mean suffix loss`: one AdamW update, compiled once per batch shape, with
    `mlx_paligemma.finetune`'s loss (prefix-LM masks, logits over the suffix span only, `<loc>` smoothing).
    Gradients are sums over tokens divided by the batch's token count, clipped, as in finetune."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    from mlx_paligemma.finetune import forward, loc_token_range, suffix_token_losses

    loss_kw = dict(loc_range=loc_token_range(processor), loc_sigma=opts.loc_smoothing)

    def loss_sum(batch: dict, last: int):
        nll, w = suffix_token_losses(forward(model, batch, last), batch, **loss_kw)
        return (nll * w).sum(), w.sum()

    value_and_grad = nn.value_and_grad(model, loss_sum)

    # the model's (and optimiser's) state is an input and an output of the compiled functions, as in
    # mlx-lm's trainer; `last` (a Python int) is a constant of each compiled shape
    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def compiled_grads(batch: dict, last: int):
        (loss, ntok), grads = value_and_grad(batch, last)
        return loss, ntok, grads

    update_state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=update_state, outputs=update_state)
    def apply_update(grads: dict, ntok: mx.array) -> None:
        grads = tree_map(lambda g: g / mx.maximum(ntok, 1), grads)
        if opts.clip > 0:
            grads, _ = optim.clip_grad_norm(grads, opts.clip)
        optimizer.update(model, grads)

    def step(numpy_batch: dict) -> float:
        numpy_batch = dict(numpy_batch)
        last = int(numpy_batch.pop("last"))
        loss, ntok, grads = compiled_grads({k: mx.array(v) for k, v in numpy_batch.items()}, last)
        apply_update(grads, ntok)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        return float(loss / mx.maximum(ntok, 1))

    return step


def measure_speed(arch: Arch, opts: TrainOptions, batches: int = 16) -> dict:
    """Steady-state training speed of `arch`: `batches` batches of the stream once (every shape gets
    compiled), then the same batches again, timed. Examples per second is what to compare between sizes
    (with how much each size learns per example: mlx_paligemma/demo/README.md)."""
    import tempfile

    from mlx_paligemma.load import load_model
    from mlx_paligemma.processor import Processor

    with tempfile.TemporaryDirectory() as tmp:
        init = build_init(Path(tmp) / "init", arch)
        model = load_model(init, "float32")
        processor = Processor.from_dir(init, model.config)
    model.train()
    optimizer = make_optimizer(opts, opts.lr * 0.1)
    stream = SceneStream(processor, opts.batch_size, opts.seed, parse_mix(opts.mix), 0.0)
    data = [b for i in range(-(-batches // stream.pool)) for b in stream.chunk(i, 0.5)][:batches]
    step = make_step(model, optimizer, processor, opts)
    t = time.perf_counter()
    for batch in data:
        step(batch)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for batch in data:
        step(batch)
    steady = time.perf_counter() - t
    return {
        "image_tokens": arch.image_tokens,
        "batches": batches,
        "first_pass_s": round(first, 1),
        "steps_per_s": round(batches / steady, 2),
        "examples_per_s": round(batches * opts.batch_size / steady, 1),
    }


def train(work: Path, opts: TrainOptions, part: PartOptions, resume: bool) -> dict:
    """One part of the run; returns the final state (step, elapsed, examples)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from mlx_paligemma.finetune import order_loc_embeddings
    from mlx_paligemma.load import load_model
    from mlx_paligemma.processor import Processor

    snapshot = latest_snapshot(work)
    source = snapshot if resume else work / "init"
    model = load_model(source, "float32")
    processor = Processor.from_dir(work / "init", model.config)
    state = {"step": 0, "elapsed": 0.0, "examples": 0}
    if resume:
        state = json.loads((snapshot / STATE).read_text())
    else:
        order_loc_embeddings(model, processor)
    model.unfreeze()
    model.train()
    optimizer = make_optimizer(opts, opts.lr)
    optimizer.init(model.trainable_parameters())
    if resume:
        optimizer.state = tree_unflatten(list(mx.load(str(snapshot / OPTIMIZER)).items()))
        mx.eval(optimizer.state)

    vocab = shapes.Vocabulary.parse(opts.shapes, opts.colours)
    stream = SceneStream(
        processor,
        opts.batch_size,
        opts.seed,
        parse_mix(opts.mix),
        opts.absent_from,
        vocab,
        pad_multiple=opts.pad_multiple,
    )
    budget = opts.minutes * 60 if opts.minutes else None
    t0 = time.perf_counter() - state["elapsed"]

    def progress(step: int) -> float:
        if opts.steps:
            return step / opts.steps
        return (time.perf_counter() - t0) / budget

    train_step = make_step(model, optimizer, processor, opts)

    source_batches = stream.batches(state["step"], progress)
    batches = Prefetcher(source_batches) if part.prefetch else source_batches
    bar = None
    if not part.quiet:
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=state["step"], desc="train", unit="step", file=sys.stderr)
    part_start, start_step = time.perf_counter(), state["step"]
    next_save = part_start + part.save_minutes * 60
    next_eval = part_start + part.eval_minutes * 60
    ema = state.get("loss_ema")

    def record() -> dict:
        rate = (state["step"] - start_step) / max(time.perf_counter() - part_start, 1e-9)
        return {
            "minutes": round(state["elapsed"] / 60, 1),
            "step": state["step"],
            "examples": state["examples"],
            "loss": round(ema, 4) if ema is not None else None,
            "lr": float(f"{lr_at(opts, state['step'], progress(state['step'])):.3g}"),
            "steps_per_s": round(rate, 3),
        }

    try:
        while True:
            now = time.perf_counter()
            if opts.steps and state["step"] >= opts.steps or budget and now - t0 >= budget:
                break
            if part.part_minutes and now - part_start >= part.part_minutes * 60:
                break
            if part.stop_after_steps and state["step"] - start_step >= part.stop_after_steps:
                break
            set_learning_rate(optimizer, opts, lr_at(opts, state["step"], progress(state["step"])))
            value = train_step(next(batches))
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            state["step"] += 1
            state["examples"] += opts.batch_size
            state["elapsed"] = time.perf_counter() - t0
            state["loss_ema"] = ema
            if bar is not None:
                bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
                bar.update(1)
            now = time.perf_counter()
            if now >= next_save:
                save_snapshot(work, model, optimizer, {**state, "options": asdict(opts)})
                next_save = now + part.save_minutes * 60
            if now >= next_eval:
                log_eval(work, model, processor, record(), part.eval_images, vocab)
                next_eval = time.perf_counter() + part.eval_minutes * 60
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
        if bar is not None:
            bar.close()
    save_snapshot(work, model, optimizer, {**state, "options": asdict(opts)})
    log_eval(work, model, processor, record(), part.eval_images, vocab)
    return state


# --- shipping --------------------------------------------------------------------------------------------

EXAMPLES_SEED = 7
PROMPTS_FILE = "prompts.json"


def example_questions(scene: shapes.Scene) -> list[str]:
    """What `mlx-paligemma demo` asks of an example image: caption, count, the colour of the leftmost
    shape whose kind occurs once, detection of the leftmost shape's kind, a multi-class detection (the
    other kinds present, or a present and an absent kind), and an absent kind when there is one."""
    kinds = list(dict.fromkeys(scene.kinds()))  # distinct, left to right
    out = [shapes.CAPTION_PROMPT, shapes.COUNT_PROMPT]
    single = [k for k in kinds if k in shapes.unique_kinds(scene)]
    if single:
        out.append(shapes.colour_prompt(single[0]))
    out.append(shapes.detect_prompt(kinds[0]))
    absent = [k for k in shapes.SHAPES if k not in kinds]
    others = kinds[1:] if len(kinds) > 2 else kinds
    out.append(shapes.detect_prompt(*others) if len(others) > 1 else shapes.detect_prompt(kinds[0], absent[0]))
    if absent:
        out.append(shapes.detect_prompt(absent[0]))
    return out


def example_scenes() -> list[shapes.Scene]:
    """The scenes of the shipped example images: three, two and one shapes from a fixed seed (never
    used for training or evaluation)."""
    rng = random.Random(EXAMPLES_SEED)
    return [shapes.make_scene(rng, count) for count in (3, 2, 1)]


def write_examples(out_dir: Path) -> list[tuple[Path, shapes.Scene]]:
    """shapes1.png .. shapes3.png and prompts.json (what the demo command asks of each image)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, plan = [], []
    for i, scene in enumerate(example_scenes(), start=1):
        path = out_dir / f"shapes{i}.png"
        with atomic_path(path, suffix=".png") as tmp:
            scene.render().save(tmp, format="PNG")
        written.append((path, scene))
        plan.append({"image": path.name, "prompts": example_questions(scene)})
    atomic_write_text(out_dir / PROMPTS_FILE, json.dumps(plan, indent=2) + "\n")
    return written


SHIPPED = (
    "config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def evaluate_all(model_dir: Path, images: int) -> dict[str, dict]:
    """The shipped model's table: MLX float32, the PyTorch backend, MLX 8-bit."""
    from benchmarks.eval_shapes import evaluate, load_backend

    out = {}
    setups = (("MLX float32", "mlx", None), ("PyTorch float32", "torch", None), ("MLX 8-bit", "mlx", 8))
    for name, backend, bits in setups:
        model, processor = load_backend(str(model_dir), backend, bits)
        out[name] = evaluate(model, processor, images, progress=True)
    return out


def write_weights(snapshot: Path, dest: Path, dtype: str) -> int:
    """The snapshot's weights stored as `dtype` (config.json says so too); returns the file's size."""
    import mlx.core as mx

    from mlx_paligemma.dtypes import mlx_dtypes

    weights = mx.load(str(snapshot / "model.safetensors"))
    target = mlx_dtypes()[dtype]
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    with atomic_path(dest / "model.safetensors", suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    config = json.loads((dest / "config.json").read_text())
    for section in (config, config["text_config"], config["vision_config"]):
        section["dtype"] = dtype
    atomic_write_text(dest / "config.json", json.dumps(config, indent=2) + "\n")
    return (dest / "model.safetensors").stat().st_size


GENERATED_START = "<!-- generated by tools/train_demo_model.py --ship: start -->"
GENERATED_END = "<!-- generated by tools/train_demo_model.py --ship: end -->"


def generated_note(state: dict, arch: dict, results: dict, curve: list[dict], eval_images: int, dtype: str) -> str:
    """The README's measured part: recipe, evaluation table, learning curve."""
    from benchmarks.eval_shapes import TABLE_ROWS

    o = state["options"]
    vision, text = arch["vision_config"], arch["text_config"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    lines = [
        GENERATED_START,
        "## Architecture and recipe (the shipped model)",
        "",
        f"- Vision: {vision['image_size']} px input, patch {vision['patch_size']} ({tokens} image tokens), SigLIP "
        f"{vision['hidden_size']} wide x {vision['num_hidden_layers']} layers.",
        f"- Decoder: Gemma {text['hidden_size']} wide x {text['num_hidden_layers']} layers, MLP "
        f"{text['intermediate_size']}, {text['num_attention_heads']} heads of {text['head_dim']}, "
        f"{text['num_key_value_heads']} KV head(s). Stored as {dtype}.",
        "- Tokenizer: sentencepiece BPE trained on the task's words, with PaliGemma's special-token layout",
        "  (`<image>`, `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`).",
        f"- Training: full, vision tower included, {state['step']} steps of batch {o['batch_size']} "
        f"({state['examples']:,} examples, each a fresh scene) in {state['elapsed'] / 60:.0f} minutes; AdamW lr "
        f"{o['lr']}, {o['warmup']} warm-up steps, cosine to {o['min_lr_ratio']} x lr; `--loc-smoothing "
        f"{o['loc_smoothing']}`, ordered `<loc>` embeddings;",
        f"  mix {describe_mix(parse_mix(o['mix']), o['absent_from'])}.",
        "",
        "## Evaluation",
        "",
        f"`python -m benchmarks.eval_shapes --model demo --images {eval_images}` (held-out scenes, fixed seed):",
        "",
        "| metric | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for label, key, percent in TABLE_ROWS:
        cells = [f"{100 * r[key]:.1f}%" if percent else f"{r[key]:.3f}" for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Learning curve",
        "",
        "Scores on held-out scenes during training (`WORK/log.txt`; kinds: the shapes whose kind the caption",
        "names right, 33% by chance):",
        "",
        "| minutes | step | examples | loss | caption | kinds | count | colour | mIoU | R@0.5 | absent | multi R@.5 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in curve:
        kinds = f"{100 * r['caption_kinds']:.0f}%" if r.get("caption_kinds") is not None else "-"
        lines.append(
            f"| {r['minutes']} | {r['step']} | {r['examples']:,} | {r['loss']} | "
            f"{100 * r['caption_exact']:.0f}% | {kinds} | "
            f"{100 * r['counting']:.0f}% | {100 * r['colour']:.0f}% | {r['detection_miou']:.3f} | "
            f"{100 * r['detection_recall50']:.0f}% | {100 * r['absent_empty']:.0f}% | "
            f"{100 * r['multi_recall50']:.0f}% |"
        )
    return "\n".join(lines + [GENERATED_END])


def ship(work: Path, dest: Path, dtype: str = "bfloat16", eval_images: int = 200) -> dict:
    """Copy the latest snapshot into the package (`dest`) as `dtype`, write the example images and the
    doctor's reference logits, evaluate, and replace the generated part of DEST/README.md."""
    from mlx_paligemma.doctor import write_demo_reference

    snapshot = latest_snapshot(work)
    if snapshot is None:
        raise PaliGemmaError(f"{work}: no training snapshot to ship (train first)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        if (snapshot / name).is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(snapshot / name, tmp)
    size = write_weights(snapshot, dest, dtype)
    if size > SIZE_LIMIT:
        raise PaliGemmaError(f"{dest}/model.safetensors: {size:,} bytes, over the {SIZE_LIMIT:,}-byte limit")
    write_examples(dest / "examples")
    write_demo_reference(dest)
    results = evaluate_all(dest, eval_images)
    state = json.loads((snapshot / STATE).read_text())
    curve = [json.loads(line) for line in (work / "log.txt").read_text().splitlines() if line.strip()]
    note = generated_note(state, json.loads((dest / "config.json").read_text()), results, curve, eval_images, dtype)
    readme = dest / "README.md"
    text = readme.read_text() if readme.is_file() else "# The shapes demo model\n"
    if GENERATED_START in text and GENERATED_END in text:
        head, rest = text.split(GENERATED_START, 1)
        text = head + note + rest.split(GENERATED_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + note + "\n"
    atomic_write_text(readme, text)
    return results


# --- command line ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    t, part, arch = TrainOptions(), PartOptions(), Arch()
    p = ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Training options (schedule, data) are fixed by a run's first part; --resume reuses them.",
    )
    p.add_argument("work_dir", help="the run's directory: init/, checkpoints/, log.txt")
    p.add_argument("--resume", action="store_true", help="continue from WORK/checkpoints/LATEST (options as saved)")
    p.add_argument("--force", action="store_true", help="start afresh although WORK holds a run (deletes it)")
    g = p.add_argument_group("schedule (fixed by the first part)")
    g.add_argument(
        "--minutes", type=float, default=t.minutes, help=f"training time in all parts (default {t.minutes:g})"
    )
    g.add_argument("--steps", type=int, default=None, help="schedule by steps instead of time (reproducible)")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help=f"examples per step (default {t.batch_size})")
    g.add_argument("--lr", type=float, default=t.lr, help=f"peak AdamW learning rate (default {t.lr:g})")
    g.add_argument(
        "--vision-lr-scale",
        type=float,
        default=t.vision_lr_scale,
        help="the vision tower's learning rate as a multiple of --lr, on the same schedule (default 1: one AdamW)",
    )
    g.add_argument(
        "--min-lr-ratio", type=float, default=t.min_lr_ratio, help="cosine floor as a fraction of --lr (default 0.05)"
    )
    g.add_argument("--warmup", type=int, default=t.warmup, help=f"linear warm-up steps (default {t.warmup})")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay, help="AdamW weight decay (default 0.01)")
    g.add_argument("--clip", type=float, default=t.clip, help="gradient norm clip (0: off)")
    g.add_argument(
        "--loc-smoothing",
        type=float,
        default=t.loc_smoothing,
        help=f"Gaussian label smoothing over neighbouring <loc> bins, sigma in bins (default {t.loc_smoothing:g})",
    )
    g.add_argument(
        "--pad-multiple",
        type=int,
        default=t.pad_multiple,
        help="sequence lengths padded to a multiple of this: each length is one compiled step (default 8)",
    )
    g = p.add_argument_group("data (fixed by the first part)")
    g.add_argument("--seed", type=int, default=t.seed, help="data and initialisation seed (default 0)")
    g.add_argument(
        "--mix", default=None, help=f"question mix, TASK=WEIGHT,... (default {t.mix}); may change at --resume"
    )
    g.add_argument(
        "--absent-from",
        type=float,
        default=None,
        help=f"absent-shape questions join the mix after this fraction of the schedule (default {t.absent_from:g});"
        " may change at --resume",
    )
    g.add_argument("--shapes", default=t.shapes, help=f"shape kinds of the scenes (default {t.shapes})")
    g.add_argument("--colours", default=t.colours, help=f"colours of the scenes (default {t.colours})")
    g = p.add_argument_group("this part")
    g.add_argument("--part-minutes", type=float, default=None, help="stop this part after so many minutes (saved)")
    g.add_argument("--stop-after-steps", type=int, default=None, help="stop this part after so many steps (saved)")
    g.add_argument("--save-minutes", type=float, default=part.save_minutes, help="snapshot every N minutes (default 5)")
    g.add_argument(
        "--eval-minutes",
        type=float,
        default=part.eval_minutes,
        help="learning-curve point every N minutes (default 12)",
    )
    g.add_argument(
        "--eval-images", type=int, default=part.eval_images, help="held-out scenes per curve point (default 60)"
    )
    g.add_argument("--no-prefetch", action="store_true", help="draw scenes in the training thread")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("architecture (a new run only; WORK/init keeps it)")
    for f in fields(Arch):
        flag = "--" + f.name.replace("_", "-")
        g.add_argument(
            flag, type=int, default=getattr(arch, f.name), help=f"{ARCH_HELP[f.name]} (default {getattr(arch, f.name)})"
        )
    g.add_argument("--count-parameters", action="store_true", help="print the architecture's parameters and size")
    g.add_argument(
        "--measure-speed",
        action="store_true",
        help="print the architecture's steady-state training speed (examples/s) and exit (WORK is not used)",
    )
    g = p.add_argument_group("shipping")
    g.add_argument("--ship", metavar="DEST", help="copy the latest snapshot to DEST (mlx_paligemma/demo) and note it")
    g.add_argument(
        "--ship-dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="storage of the shipped weights (default bfloat16: half the bytes; computed in float32 on a CPU)",
    )
    g.add_argument(
        "--ship-eval-images", type=int, default=200, help="held-out scenes of the shipped table (default 200)"
    )
    return p


def train_options(args: argparse.Namespace) -> TrainOptions:
    given = {f.name: getattr(args, f.name) for f in fields(TrainOptions) if getattr(args, f.name) is not None}
    return TrainOptions(**given)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    arch = Arch(**{f.name: getattr(args, f.name) for f in fields(Arch)})
    work = Path(args.work_dir)

    def body() -> int:
        if args.count_parameters:
            n = parameter_count(arch)
            print(f"{n:,} parameters: {4 * n / 2**20:.1f} MiB in float32, {2 * n / 2**20:.1f} MiB in 16 bits")
            return 0
        if args.measure_speed:
            opts = train_options(args)
            print(json.dumps({**asdict(arch), "parameters": parameter_count(arch), **measure_speed(arch, opts)}))
            return 0
        if args.ship:
            results = ship(work, Path(args.ship), args.ship_dtype, args.ship_eval_images)
            print(json.dumps(results, indent=2))
            return 0
        opts = train_options(args)
        if opts.steps:
            opts.minutes = None
        parse_mix(opts.mix)  # errors before anything is built
        shapes.Vocabulary.parse(opts.shapes, opts.colours)
        part = PartOptions(
            part_minutes=args.part_minutes,
            stop_after_steps=args.stop_after_steps,
            save_minutes=args.save_minutes,
            eval_minutes=args.eval_minutes,
            eval_images=args.eval_images,
            prefetch=not args.no_prefetch,
            quiet=args.quiet,
        )
        snapshot = latest_snapshot(work)
        if args.resume:
            if snapshot is None:
                raise PaliGemmaError(f"--resume: {work} has no snapshot to resume from")
            opts = TrainOptions(**json.loads((snapshot / STATE).read_text())["options"])
            opts.mix = args.mix or opts.mix  # the mix may be adjusted between parts
            opts.absent_from = opts.absent_from if args.absent_from is None else args.absent_from
        elif snapshot is not None or (work / "log.txt").exists():
            if not args.force:
                raise PaliGemmaError(f"{work}: holds a run; pass --resume to continue it or --force to start afresh")
            for name in ("init", CHECKPOINTS, "log.txt"):
                path = work / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if not (work / "init").is_dir():
            build_init(work / "init", arch, seed=opts.seed)
        elif not args.resume:
            print(f"{work}/init exists: training it (its architecture, not the options')", file=sys.stderr)
        print(f"mix: {describe_mix(parse_mix(opts.mix), opts.absent_from)}", file=sys.stderr)
        state = train(work, opts, part, resume=args.resume)
        done = (
            "done"
            if (opts.steps and state["step"] >= opts.steps) or (opts.minutes and state["elapsed"] >= opts.minutes * 60)
            else "resume with --resume"
        )
        print(f"{work}: step {state['step']}, {state['elapsed'] / 60:.1f} min, {state['examples']:,} examples ({done})")
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
