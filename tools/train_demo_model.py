"""Build and train the demo model that ships in `mlx_paligemma/demo/`, from scratch, on the shapes task.

    LD_PRELOAD=/work/venv/lib/libmkl_rt.so.3 python -m tools.train_demo_model WORK_DIR [--minutes 60]

Steps (each skipped when its output exists, so a rerun resumes):
1. `WORK/init`: a small PaliGemma-architecture checkpoint with random weights and its own sentencepiece
   tokenizer in the PaliGemma layout (`<image>`, `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`);
2. `WORK/data`: synthetic shapes scenes (tools/shapes.py) as images + JSON lines;
3. `WORK/run`: `mlx_paligemma.finetune` (full fine-tuning, vision tower included, ordered `<loc>`
   embeddings, Gaussian `<loc>` label smoothing), saving every few minutes (`--resume` semantics)
   and logging per-task accuracy on held-out scenes to `WORK/log.txt` every `--eval-minutes`.
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
from pathlib import Path

from mlx_paligemma.fsutil import atomic_write_text
from tools import shapes
from tools.make_tiny_checkpoint import BOS_ID, EOS_ID, PAD_ID, build_sentencepiece_model, write_processor_files

VOCAB_MULTIPLE = 64

# The architecture (measured candidates are in the demo's README.md).
ARCH = dict(
    image_size=64,
    patch_size=16,
    vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
    text=dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1
    ),
    head_dim=64,
)


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
    word is one or two pieces."""
    return build_sentencepiece_model(_corpus(), pieces)


def _write_processor(out_dir: Path, image_size: int, num_image_tokens: int) -> int:
    """Tokenizer + image-processor files as transformers' PaliGemmaProcessor writes them; returns `<image>`'s id."""
    return write_processor_files(out_dir, image_size, num_image_tokens, build_sentencepiece())


def build_init(out_dir: str | Path, arch: dict = ARCH, seed: int = 0) -> Path:
    """A random-weight checkpoint of `arch` with the demo tokenizer (MLX's default initialisation)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from transformers import PaliGemmaConfig

    from mlx_paligemma.config import load_config
    from mlx_paligemma.fsutil import atomic_dir
    from mlx_paligemma.models import Model

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        n_img = (arch["image_size"] // arch["patch_size"]) ** 2
        image_token = _write_processor(tmp, arch["image_size"], n_img)
        vocab = math.ceil((image_token + 1) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        text = dict(arch["text"], model_type="gemma", vocab_size=vocab, head_dim=arch["head_dim"], dtype="float32")
        vision = dict(
            arch["vision"],
            model_type="siglip_vision_model",
            patch_size=arch["patch_size"],
            image_size=arch["image_size"],
            layer_norm_eps=1e-6,
            vision_use_head=False,
            dtype="float32",
        )
        config = PaliGemmaConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=text["hidden_size"],
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


def write_mixed_dataset(out_dir: Path, images: int, seed: int) -> Path:
    """Scenes with a question mix weighted towards the hard tasks: every caption and detection of a present
    kind, the count half the time, one colour question, and an absent-kind detection one time in five."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(images):
        scene = shapes.make_scene(rng)
        name = f"images/{i:06d}.png"
        if not (out_dir / name).exists():
            scene.render().save(out_dir / name)
        kinds = [s.kind for s in scene.shapes]
        qs = [(shapes.CAPTION_PROMPT, shapes.caption(scene))]
        if rng.random() < 0.5:
            qs.append((shapes.COUNT_PROMPT, str(len(scene.shapes))))
        single = [k for k in shapes.SHAPES if kinds.count(k) == 1]
        if single:
            k = rng.choice(single)
            qs.append((shapes.colour_prompt(k), next(s.colour for s in scene.shapes if s.kind == k)))
        qs += [(shapes.detect_prompt(k), shapes.detection(scene, k)) for k in shapes.SHAPES if k in kinds]
        absent = [k for k in shapes.SHAPES if k not in kinds]
        if absent and rng.random() < 0.2:
            qs.append((shapes.detect_prompt(rng.choice(absent)), ""))
        lines += [json.dumps({"image": name, "prefix": p, "suffix": s}) for p, s in qs]
    path = out_dir / "data.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    # The second curriculum stage: the same questions without the empty (absent-kind) detections.
    present = [line for line in lines if not line.endswith('"suffix": ""}')]
    atomic_write_text(out_dir / "data_present.jsonl", "\n".join(present) + "\n")
    return path


EXAMPLES_SEED = 7


def write_examples(out_dir: Path) -> list[tuple[Path, shapes.Scene]]:
    """The example images shipped with the demo: scenes of three, two and one shapes from a fixed seed
    (never used for training or evaluation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(EXAMPLES_SEED)
    written = []
    for i, count in enumerate((3, 2, 1), start=1):
        scene = shapes.make_scene(rng, count)
        path = out_dir / f"shapes{i}.png"
        scene.render().save(path)
        written.append((path, scene))
    return written


class TimedEval:
    """The finetune callback: every `minutes`, score the model on held-out scenes and append to the log."""

    def __init__(self, log: Path, minutes: float, images: int):
        self.log, self.every, self.images = log, minutes * 60, images
        self.next = self.every

    def __call__(self, step: int, model, processor, info: dict) -> None:
        if info["elapsed"] < self.next:
            return
        self.next = info["elapsed"] + self.every
        from benchmarks.eval_shapes import evaluate

        t = time.perf_counter()
        metrics = evaluate(model, processor, self.images)
        record = {"minutes": round(info["elapsed"] / 60, 1), "step": step, "loss": round(info["loss_ema"], 4)}
        record.update({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        record["eval_seconds"] = round(time.perf_counter() - t, 1)
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"eval: {json.dumps(record)}", file=sys.stderr, flush=True)


SHIPPED = (
    "config.json",
    "model.safetensors",
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


def ship(work: Path, dest: Path, eval_images: int = 200, note_extra: str = "") -> dict:
    """Copy the trained model into the package (`dest`), evaluate it, and write its README.md note."""
    from benchmarks.eval_shapes import TABLE_ROWS

    run = work / "run"
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        if (run / name).is_file():
            shutil.copyfile(run / name, dest / name)
    write_examples(dest / "examples")
    results = evaluate_all(dest, eval_images)
    state = json.loads((run / "training_state" / "state.json").read_text())
    curve = [json.loads(line) for line in (work / "log.txt").read_text().splitlines() if line.strip()]
    lines = [
        "# The shapes demo model",
        "",
        "A small PaliGemma-architecture model (SigLIP + Gemma, the same modules and checkpoint layout as",
        "the real ones) trained from scratch, on 2 CPU cores, by `python -m tools.train_demo_model`, with",
        "this package's own fine-tuning code (`mlx_paligemma.finetune`), on the synthetic shapes task of",
        "`tools/shapes.py`. It knows nothing but coloured circles, squares and triangles.",
        "",
        "## Architecture and recipe",
        "",
        f"- Vision: {ARCH['image_size']} px input, patch {ARCH['patch_size']} "
        f"({(ARCH['image_size'] // ARCH['patch_size']) ** 2} image tokens), SigLIP "
        f"{ARCH['vision']['hidden_size']} wide x {ARCH['vision']['num_hidden_layers']} layers.",
        f"- Decoder: Gemma {ARCH['text']['hidden_size']} wide x {ARCH['text']['num_hidden_layers']} layers, "
        f"MLP {ARCH['text']['intermediate_size']}, {ARCH['text']['num_attention_heads']} heads of {ARCH['head_dim']}, "
        f"1 KV head.",
        "- Tokenizer: sentencepiece BPE trained on the task's words, with PaliGemma's special-token layout",
        "  (`<image>`, `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`).",
        f"- Training: full fine-tuning incl. the vision tower, {state['step']} steps of batch "
        f"{state['options']['batch_size']} in {state['elapsed'] / 60:.0f} minutes "
        f"(AdamW lr {state['options']['lr']}, {state['options']['warmup']} warm-up steps, then cosine decay over "
        f"the time budget; `--order-loc-embeddings`, `--loc-smoothing {state['options']['loc_smoothing']}`), "
        "40,000 training scenes, float32 with MKL.",
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
        "Per-task scores on 100 held-out scenes, measured during training (`log.txt` of the run):",
        "",
        "| minutes | step | caption | counting | colour | det. mIoU | det. recall@0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in curve:
        lines.append(
            f"| {r['minutes']} | {r['step']} | {100 * r['caption_exact']:.0f}% | {100 * r['counting']:.0f}% | "
            f"{100 * r['colour']:.0f}% | {r['detection_miou']:.3f} | {100 * r['detection_recall50']:.0f}% |"
        )
    if note_extra:
        lines += ["", note_extra.strip()]
    atomic_write_text(dest / "README.md", "\n".join(lines) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_demo_model", description=__doc__.split("\n\n")[0])
    p.add_argument("work_dir")
    p.add_argument("--images", type=int, default=40000, help="training scenes")
    p.add_argument("--minutes", type=float, default=78.0, help="training time budget (wall clock)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--loc-smoothing", type=float, default=10.0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-minutes", type=float, default=12.0)
    p.add_argument("--eval-images", type=int, default=100)
    p.add_argument(
        "--data-file",
        default="data.jsonl",
        help="training file in WORK/data: data.jsonl (with empty answers) or data_present.jsonl (stage 2)",
    )
    p.add_argument("--init-only", action="store_true")
    p.add_argument("--ship", metavar="DEST", help="copy the trained model to DEST (mlx_paligemma/demo), evaluate, note")
    p.add_argument("--note", help="a file of extra notes (design iterations) appended to the README")
    args = p.parse_args(argv)

    from mlx_paligemma.finetune import STATE_FILE, FinetuneOptions, finetune

    work = Path(args.work_dir)
    if args.ship:
        extra = Path(args.note).read_text() if args.note else ""
        results = ship(work, Path(args.ship), note_extra=extra)
        print(json.dumps(results, indent=2))
        return 0
    if not (work / "init").is_dir():
        build_init(work / "init")
    if args.init_only:
        return 0
    train = work / "data" / args.data_file
    if not train.is_file():
        print(f"writing {args.images} training scenes to {train.parent}", file=sys.stderr)
        write_mixed_dataset(train.parent, args.images, seed=1)
    val = work / "val" / "data.jsonl"
    if not val.is_file():
        write_mixed_dataset(val.parent, 200, seed=2)
    run = work / "run"
    opts = FinetuneOptions(
        model=str(work / "init"),
        data=str(train),
        val=str(val),
        out=str(run),
        full=True,
        lora_rank=None,
        train_vision=True,
        epochs=100,
        time_budget=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=0.01,
        clip=1.0,
        seed=0,
        save_every=args.save_every,
        loc_smoothing=args.loc_smoothing,
        order_loc_embeddings=True,
        resume=(run / STATE_FILE).is_file(),
    )
    result = finetune(opts, callback=TimedEval(work / "log.txt", args.eval_minutes, args.eval_images))
    print(f"{result.out}: {result.steps} steps in {result.seconds / 60:.1f} min, loss {result.train_loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
