"""`mlx-paligemma demo`: the built-in demo model answers questions about its own example images.

    mlx-paligemma demo [--out demo.png] [--force] [--json] [--backend mlx|torch]

Prints every question and its answer on stdout (image, prompt -> answer): a caption, a count, a colour,
a detection, a multi-class detection (`detect a ; b`) and, where a shape kind is missing, a detection of
it (the right answer is empty). Writes one PNG, the example images side by side with every detected
box drawn and labelled. Works offline right after install: the model (trained on synthetic shapes by
tools/train_demo_model.py) and its example images ship inside the package.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..cli import ArgumentParser, run_main
from ..errors import PaliGemmaError

PROG = "mlx-paligemma demo"
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
EXAMPLES_DIR = DEMO_DIR / "examples"
PROMPTS_FILE = EXAMPLES_DIR / "prompts.json"  # written with the images by tools/train_demo_model.py
GAP = 8  # pixels between the images in the PNG


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Run the built-in demo model on its example images (offline).")
    p.add_argument("--out", default="demo.png", help="PNG with the detected boxes drawn (default demo.png)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON list (image, prompt, answer, boxes)")
    p.add_argument("--backend", choices=("mlx", "torch"), default="mlx", help="mlx (default) or the PyTorch reference")
    return p


def example_plan() -> list[dict]:
    """[{"image": "shapes1.png", "prompts": [...]}, ...]: what the demo asks of each example image."""
    try:
        return json.loads(PROMPTS_FILE.read_text())
    except (OSError, ValueError) as e:
        raise PaliGemmaError(f"{PROMPTS_FILE}: cannot read the demo's questions ({e}); reinstall the package") from None


def run_demo(model, processor) -> list[dict]:
    """Every (image, prompt) of the plan answered greedily (detect prompts constrained to the answer grammar):
    dicts with image, prompt, answer and boxes (x0, y0, x1, y1 in the image's pixels, for detection prompts)."""
    from PIL import Image

    from ..generation import generate
    from ..grammar import grammar_processors
    from ..tasks import parse_detections

    rows = []
    for item in example_plan():
        path = EXAMPLES_DIR / item["image"]
        image = Image.open(path).convert("RGB")
        prompts = item["prompts"]
        # detect prompts constrained to the answer grammar, as `generate` and `mp.detect` do by default
        grammars = grammar_processors(processor, prompts)
        results = generate(model, processor, [image] * len(prompts), prompts, max_tokens=60, logits_processors=grammars)
        for prompt, result in zip(item["prompts"], results):
            boxes = parse_detections(result.text, image.size) if prompt.startswith("detect ") else []
            rows.append({"image": item["image"], "prompt": prompt, "answer": result.text.strip(), "boxes": boxes})
    return rows


def draw(rows: list[dict]):
    """The example images side by side, each with the boxes of all its detection answers."""
    from PIL import Image

    from ..tasks import draw_detections

    names = list(dict.fromkeys(r["image"] for r in rows))
    panels = []
    for name in names:
        image = Image.open(EXAMPLES_DIR / name).convert("RGB")
        boxes = [b for r in rows if r["image"] == name for b in r["boxes"]]
        panels.append(draw_detections(image, boxes))
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + GAP
    return canvas


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir():
        parser.error(f"--out: {out} is a directory")
    if out.exists() and not args.force:
        parser.error(f"--out: {out} exists; pass --force to overwrite it")
    if not out.resolve().parent.is_dir():
        parser.error(f"--out: directory of {out} does not exist")

    def body() -> int:
        from ..fsutil import atomic_path

        if args.backend == "torch":
            from ..reference import load as load_torch

            model, processor = load_torch(DEMO_DIR, dtype="float32")
        else:
            from ..load import load

            model, processor = load(DEMO_DIR)
        print("the built-in demo model (trained on synthetic shapes only) on its example images:", file=sys.stderr)
        rows = run_demo(model, processor)
        if args.json:
            print(json.dumps([dict(r, boxes=[b.to_dict() for b in r["boxes"]]) for r in rows], indent=2))
        else:
            width = max(len(r["prompt"]) for r in rows)
            for r in rows:
                print(f"{r['image']}  {r['prompt']:<{width}}  →  {r['answer'] or '(nothing)'}")
        with atomic_path(out, suffix=".png") as tmp:
            draw(rows).save(tmp, format="PNG")
        print(f"boxes drawn in {out}", file=sys.stderr)
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    from ..cli import main_entry

    main_entry(main)
