"""The synthetic shapes task: 224x224 scenes of 1-3 filled shapes, with PaliGemma-style prompts and answers.

Scenes: 1-3 non-overlapping filled shapes (by default circle, square, triangle) in red, green, blue or
yellow (by default), each 20-45% of the image side, on a uniform light background of random colour.
Prompts and answers:

- `caption en` -> `a red circle`, `a red circle and a blue square`, `a red circle, a blue square and a green
  triangle` (left to right);
- `detect circle` -> `<locY0><locX0><locY1><locX1> circle` per object, joined by ` ; `, left to right, in
  PaliGemma's 1024-bin convention; empty when there is none (an absent shape);
- `detect circle ; square` (PaliGemma's multi-class form) -> every circle and square, left to right, each
  with its own label; empty when neither is there;
- `answer en how many shapes are there?` -> `1`, `2` or `3`;
- `answer en what color is the square?` (only when there is exactly one square) -> `blue`.

New shapes (star, hexagon, diamond, pentagon) and colours (purple, orange, pink, cyan) are drawn when asked
for: the demo model never saw them, which is what "teach it something new" fine-tunes.

Usable as a module (`make_scene`, `examples_for`, `ask`, `write_dataset`) and as a CLI that writes a
dataset in the fine-tuning format (images + JSON lines):

    python -m tools.shapes OUT_DIR --images 1000 [--seed 0] [--shapes circle,square,triangle,star]
        [--colours red,green,blue,yellow,purple] [--absent-detect 0.25] [--multi-detect 0.0]
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image, ImageDraw

SIZE = 224
# The demo model's shapes and colours: scenes drawn from these are the task it was trained on.
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
# Shapes and colours the demo model has never seen, for teaching it something new.
EXTRA_SHAPES = ("star", "hexagon", "diamond", "pentagon")
EXTRA_COLOURS = {"purple": (140, 50, 190), "orange": (245, 130, 20), "pink": (240, 110, 180), "cyan": (30, 190, 210)}
ALL_SHAPES = SHAPES + EXTRA_SHAPES
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
LOC_BINS = 1024
CAPTION_PROMPT = "caption en"
COUNT_PROMPT = "answer en how many shapes are there?"
# The kinds of question `ask` can put to a scene.
TASKS = ("caption", "count", "colour", "detect", "multi", "absent")


class ShapesError(ValueError):
    """An unknown shape or colour name, or a task that cannot be asked."""


@dataclass(frozen=True)
class Vocabulary:
    """Which shapes and colours scenes are drawn from (the demo model's by default)."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in ALL_SHAPES]
        if unknown or len(set(self.shapes)) != len(self.shapes) or not self.shapes:
            raise ShapesError(f"shapes: {', '.join(self.shapes)}: each once, from {', '.join(ALL_SHAPES)}")
        unknown = [c for c in self.colours if c not in ALL_COLOURS]
        if unknown or len(set(self.colours)) != len(self.colours) or not self.colours:
            raise ShapesError(f"colours: {', '.join(self.colours)}: each once, from {', '.join(ALL_COLOURS)}")

    @classmethod
    def parse(cls, shapes: Optional[str] = None, colours: Optional[str] = None) -> Vocabulary:
        """From comma-separated lists (None: the default set)."""
        split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())
        return cls(split(shapes) if shapes else SHAPES, split(colours) if colours else tuple(COLOURS))


DEFAULT = Vocabulary()


def colour_prompt(shape: str) -> str:
    return f"answer en what color is the {shape}?"


def detect_prompt(*kinds: str) -> str:
    """`detect circle`, or PaliGemma's multi-class form `detect circle ; square`."""
    return "detect " + " ; ".join(kinds)


@dataclass
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


def _unit_polygon(kind: str) -> list[tuple[float, float]]:
    """Vertices in [0, 1]^2 touching all four sides (so the box is the shape's tight box)."""
    if kind == "star":
        points = [(90 + 36 * i, 1.0 if i % 2 == 0 else 0.4) for i in range(10)]
    elif kind == "hexagon":
        points = [(60 * i, 1.0) for i in range(6)]
    elif kind == "pentagon":
        points = [(90 + 72 * i, 1.0) for i in range(5)]
    elif kind == "diamond":
        points = [(90 * i, 1.0) for i in range(4)]
    else:
        raise ShapesError(f"no polygon for {kind!r}")
    xy = [(r * math.cos(math.radians(a)), -r * math.sin(math.radians(a))) for a, r in points]
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in xy]


@dataclass
class Scene:
    background: tuple[int, int, int]
    shapes: list[Shape]  # left to right

    def render(self, size: int = SIZE) -> Image.Image:
        img = Image.new("RGB", (size, size), self.background)
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            x0, y0, x1, y1 = s.box
            fill = ALL_COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif s.kind == "square":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif s.kind == "triangle":
                draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
            else:
                w, h = x1 - 1 - x0, y1 - 1 - y0
                draw.polygon([(x0 + u * w, y0 + v * h) for u, v in _unit_polygon(s.kind)], fill=fill)
        return img

    def kinds(self) -> list[str]:
        return [s.kind for s in self.shapes]


def make_scene(rng: random.Random, count: int | None = None, vocab: Vocabulary = DEFAULT) -> Scene:
    """A random scene; `count` shapes (1-3, random when None), bounding boxes disjoint with a 2-px gap.

    With the default vocabulary the random draws are those of the first version, so the held-out
    evaluation scenes and the shipped example images stay what they were."""
    count = count or rng.randint(1, 3)
    while True:
        shapes: list[Shape] = []
        for _ in range(count):
            for _attempt in range(100):
                side = rng.randint(round(0.20 * SIZE), round(0.45 * SIZE))
                x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
                box = (x0, y0, x0 + side, y0 + side)
                if all(_gap(box, s.box) >= 2 for s in shapes):
                    shapes.append(Shape(rng.choice(vocab.shapes), rng.choice(vocab.colours), box))
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
    parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in scene.shapes]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def detection(scene: Scene, kinds: Union[str, Sequence[str]]) -> str:
    """The answer to `detect_prompt(*kinds)`: every object of those kinds, left to right, each labelled."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    return " ; ".join(f"{box_tokens(s.box)} {s.kind}" for s in scene.shapes if s.kind in kinds)


def unique_kinds(scene: Scene, vocab: Vocabulary = DEFAULT) -> list[str]:
    """Kinds that occur exactly once: the ones whose colour can be asked."""
    kinds = scene.kinds()
    return [k for k in vocab.shapes if kinds.count(k) == 1]


def ask(scene: Scene, task: str, rng: random.Random, vocab: Vocabulary = DEFAULT) -> Optional[tuple[str, str]]:
    """One question of kind `task` (see TASKS) about `scene` as (prefix, suffix), None when it cannot be
    asked (no shape kind occurs once, for `colour`; every kind is present, for `absent`).

    `multi` asks for a present kind and one other kind (present or not) in random order."""
    kinds = scene.kinds()
    if task == "caption":
        return CAPTION_PROMPT, caption(scene)
    if task == "count":
        return COUNT_PROMPT, str(len(scene.shapes))
    if task == "colour":
        single = unique_kinds(scene, vocab)
        if not single:
            return None
        kind = rng.choice(single)
        return colour_prompt(kind), next(s.colour for s in scene.shapes if s.kind == kind)
    if task == "detect":
        kind = rng.choice(sorted(set(kinds), key=vocab.shapes.index))
        return detect_prompt(kind), detection(scene, kind)
    if task == "multi":
        first = rng.choice(sorted(set(kinds), key=vocab.shapes.index))
        second = rng.choice([k for k in vocab.shapes if k != first])
        pair = [first, second] if rng.random() < 0.5 else [second, first]
        return detect_prompt(*pair), detection(scene, pair)
    if task == "absent":
        absent = [k for k in vocab.shapes if k not in kinds]
        return (detect_prompt(rng.choice(absent)), "") if absent else None
    raise ShapesError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")


def examples_for(
    scene: Scene,
    rng: random.Random,
    absent_detect: float = 0.25,
    vocab: Vocabulary = DEFAULT,
    multi_detect: float = 0.0,
) -> list[tuple[str, str]]:
    """Every question worth asking of a scene, as (prefix, suffix) pairs.

    Caption, count, colour of each shape kind that occurs once, detection of each kind present, (with
    probability `absent_detect`) detection of one absent kind, so that empty answers are learned but stay
    rarer than real ones, and (with probability `multi_detect`) one multi-class `detect a ; b`.
    """
    out = [(CAPTION_PROMPT, caption(scene)), (COUNT_PROMPT, str(len(scene.shapes)))]
    kinds = scene.kinds()
    for kind in unique_kinds(scene, vocab):
        out.append((colour_prompt(kind), next(s.colour for s in scene.shapes if s.kind == kind)))
    for kind in vocab.shapes:
        if kind in kinds:
            out.append((detect_prompt(kind), detection(scene, kind)))
    absent = [k for k in vocab.shapes if k not in kinds]
    if absent and rng.random() < absent_detect:
        kind = rng.choice(absent)
        out.append((detect_prompt(kind), ""))
    if multi_detect > 0 and len(vocab.shapes) > 1 and rng.random() < multi_detect:
        out.append(ask(scene, "multi", rng, vocab))
    return out


def write_dataset(
    out_dir: str | Path,
    images: int,
    seed: int = 0,
    absent_detect: float = 0.25,
    vocab: Vocabulary = DEFAULT,
    multi_detect: float = 0.0,
) -> Path:
    """Write `images` PNG scenes and `data.jsonl` (all their questions) into `out_dir`; returns the JSONL path."""
    from mlx_paligemma.fsutil import atomic_write_text

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(images):
        scene = make_scene(rng, vocab=vocab)
        name = f"images/{i:06d}.png"
        scene.render().save(out_dir / name)
        for prefix, suffix in examples_for(scene, rng, absent_detect, vocab, multi_detect):
            lines.append(json.dumps({"image": name, "prefix": prefix, "suffix": suffix}))
    path = out_dir / "data.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from mlx_paligemma.cli import ArgumentParser

    p = ArgumentParser(prog="python -m tools.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="directory for images/ and data.jsonl")
    p.add_argument("--images", type=int, default=1000, help="scenes to draw (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0; evaluation uses its own)")
    p.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated shape kinds scenes draw from (default {','.join(SHAPES)}; "
        f"also available: {','.join(EXTRA_SHAPES)})",
    )
    p.add_argument(
        "--colours",
        default=None,
        help=f"comma-separated colours (default {','.join(COLOURS)}; also available: {','.join(EXTRA_COLOURS)})",
    )
    p.add_argument("--absent-detect", type=float, default=0.25, help="chance of one absent-kind detect question")
    p.add_argument("--multi-detect", type=float, default=0.0, help="chance of one `detect a ; b` question per scene")
    args = p.parse_args(argv)
    try:
        vocab = Vocabulary.parse(args.shapes, args.colours)
    except ShapesError as e:
        p.error(f"--{str(e)}")
    if args.images < 1:
        p.error("--images: must be at least 1")
    path = write_dataset(args.out_dir, args.images, args.seed, args.absent_detect, vocab, args.multi_detect)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
