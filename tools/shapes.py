"""The synthetic shapes task: 224x224 scenes of 1-3 filled shapes, with PaliGemma-style prompts and answers.

Scenes: 1-3 non-overlapping filled shapes (circle, square, triangle) in red, green, blue or yellow, each
20-45% of the image side, on a uniform light background of random colour. Prompts and answers:

- `caption en` -> `a red circle`, `a red circle and a blue square`, `a red circle, a blue square and a green
  triangle` (left to right);
- `detect circle` -> `<locY0><locX0><locY1><locX1> circle` per object, joined by ` ; `, left to right, in
  PaliGemma's 1024-bin convention; empty when there is none;
- `answer en how many shapes are there?` -> `1`, `2` or `3`;
- `answer en what color is the square?` (only when there is exactly one square) -> `blue`.

Usable as a module (`make_scene`, `examples_for`, `write_dataset`) and as a CLI that writes a dataset in
the fine-tuning format (images + JSON lines):

    python -m tools.shapes OUT_DIR --images 1000 [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 224
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
LOC_BINS = 1024
CAPTION_PROMPT = "caption en"
COUNT_PROMPT = "answer en how many shapes are there?"


def colour_prompt(shape: str) -> str:
    return f"answer en what color is the {shape}?"


def detect_prompt(shape: str) -> str:
    return f"detect {shape}"


@dataclass
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class Scene:
    background: tuple[int, int, int]
    shapes: list[Shape]  # left to right

    def render(self, size: int = SIZE) -> Image.Image:
        img = Image.new("RGB", (size, size), self.background)
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            x0, y0, x1, y1 = s.box
            fill = COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif s.kind == "square":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            else:
                draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
        return img


def make_scene(rng: random.Random, count: int | None = None) -> Scene:
    """A random scene; `count` shapes (1-3, random when None), bounding boxes disjoint with a 2-px gap."""
    count = count or rng.randint(1, 3)
    while True:
        shapes: list[Shape] = []
        for _ in range(count):
            for _attempt in range(100):
                side = rng.randint(round(0.20 * SIZE), round(0.45 * SIZE))
                x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
                box = (x0, y0, x0 + side, y0 + side)
                if all(_gap(box, s.box) >= 2 for s in shapes):
                    shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), box))
                    break
        if len(shapes) == count:
            break
    background = tuple(rng.randint(200, 255) for _ in range(3))
    return Scene(background, sorted(shapes, key=lambda s: s.centre_x))


def _gap(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Chebyshev gap between two boxes (negative when they overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def loc_token(value: float, size: int = SIZE) -> str:
    return f"<loc{min(LOC_BINS - 1, max(0, round(value / size * LOC_BINS))):04d}>"


def box_tokens(box: tuple[int, int, int, int], size: int = SIZE) -> str:
    x0, y0, x1, y1 = box
    return loc_token(y0, size) + loc_token(x0, size) + loc_token(y1, size) + loc_token(x1, size)


def caption(scene: Scene) -> str:
    parts = [f"a {s.colour} {s.kind}" for s in scene.shapes]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def detection(scene: Scene, kind: str) -> str:
    return " ; ".join(f"{box_tokens(s.box)} {kind}" for s in scene.shapes if s.kind == kind)


def examples_for(scene: Scene, rng: random.Random, absent_detect: float = 0.25) -> list[tuple[str, str]]:
    """Every question worth asking of a scene, as (prefix, suffix) pairs.

    Caption, count, colour of each shape kind that occurs once, detection of each kind present, and
    (with probability `absent_detect`) detection of one absent kind, so that empty answers are learned
    but stay rarer than real ones.
    """
    out = [(CAPTION_PROMPT, caption(scene)), (COUNT_PROMPT, str(len(scene.shapes)))]
    kinds = [s.kind for s in scene.shapes]
    for kind in SHAPES:
        if kinds.count(kind) == 1:
            out.append((colour_prompt(kind), next(s.colour for s in scene.shapes if s.kind == kind)))
    for kind in SHAPES:
        if kind in kinds:
            out.append((detect_prompt(kind), detection(scene, kind)))
    absent = [k for k in SHAPES if k not in kinds]
    if absent and rng.random() < absent_detect:
        kind = rng.choice(absent)
        out.append((detect_prompt(kind), ""))
    return out


def write_dataset(out_dir: str | Path, images: int, seed: int = 0, absent_detect: float = 0.25) -> Path:
    """Write `images` PNG scenes and `data.jsonl` (all their questions) into `out_dir`; returns the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(images):
        scene = make_scene(rng)
        name = f"images/{i:06d}.png"
        scene.render().save(out_dir / name)
        for prefix, suffix in examples_for(scene, rng, absent_detect):
            lines.append(json.dumps({"image": name, "prefix": prefix, "suffix": suffix}))
    path = out_dir / "data.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--absent-detect", type=float, default=0.25, help="chance of one absent-kind detect question")
    args = p.parse_args(argv)
    path = write_dataset(args.out_dir, args.images, args.seed, args.absent_detect)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
