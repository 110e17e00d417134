"""The shapes task: seeded images of coloured shapes and questions whose answer lives in the region
the question names. Used to train the bundled model and to measure accuracy against a budget.

Every sample is a pure function of (split, index): ``sample("test", 17)`` is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
QUESTION_TYPES = ("color", "shape", "exists", "count", "where")
SPLITS = {"train": 0, "val": 1, "test": 2}  # seed stream per split: the splits never share a seed

MIN_SIZE, MAX_SIZE = 40, 80
COLOR_JITTER = 20
MIDLINE_MARGIN = 8  # no object centre this close to a midline: "where" is never ambiguous


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: int
    cy: int
    size: int  # side of the bounding square, px

    @property
    def quadrant(self) -> str:
        half = IMAGE_SIZE // 2
        return ("top-" if self.cy < half else "bottom-") + ("left" if self.cx < half else "right")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    objects: tuple[Obj, ...]
    kind: str  # one of QUESTION_TYPES
    question: str
    answer: str


def _place(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """n non-overlapping (cx, cy, size) squares inside the image, away from the midlines."""
    boxes: list[tuple[int, int, int]] = []
    half = IMAGE_SIZE // 2
    while len(boxes) < n:
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        r = size // 2
        cx, cy = (int(v) for v in rng.integers(r + 2, IMAGE_SIZE - r - 2, size=2))
        if abs(cx - half) < MIDLINE_MARGIN or abs(cy - half) < MIDLINE_MARGIN:
            continue
        gap = 4
        if all(
            abs(cx - bx) >= r + bs // 2 + gap or abs(cy - by) >= r + bs // 2 + gap
            for bx, by, bs in boxes
        ):
            boxes.append((cx, cy, size))
    return boxes


def random_scene(rng: np.random.Generator) -> tuple[Obj, ...]:
    n = int(rng.integers(3, 7))
    return tuple(
        Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), cx, cy, size)
        for cx, cy, size in _place(rng, n)
    )


def render(objects: tuple[Obj, ...], rng: np.random.Generator) -> Image.Image:
    """Light uniform background with mild noise; filled shapes with per-channel colour jitter."""
    bg = int(rng.integers(220, 250))
    noise = rng.integers(-6, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for o in objects:
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[o.color]) + jitter, 0, 255))
        r = o.size // 2
        box = (o.cx - r, o.cy - r, o.cx + r, o.cy + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(o.cx, o.cy - r), (o.cx - r, o.cy + r), (o.cx + r, o.cy + r)], fill=fill)
    return image


def _ask(kind: str, objects: tuple[Obj, ...], rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of ``kind`` about ``objects``, or None if this scene cannot pose it."""
    by_shape = {s: [o for o in objects if o.shape == s] for s in SHAPES}
    by_color = {c: [o for o in objects if o.color == c] for c in COLORS}
    if kind == "color":
        options = [s for s in SHAPES if len(by_shape[s]) == 1]
        if not options:
            return None
        shape = str(rng.choice(options))
        return f"What color is the {shape}?", by_shape[shape][0].color
    if kind == "shape":
        options = [c for c in COLORS if len(by_color[c]) == 1]
        if not options:
            return None
        color = str(rng.choice(options))
        return f"What shape is the {color} object?", by_color[color][0].shape
    if kind == "exists":
        present = sorted({(o.color, o.shape) for o in objects})
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        yes = bool(rng.integers(2)) or not absent
        pool = present if yes else absent
        color, shape = pool[rng.integers(len(pool))]
        return f"Is there a {color} {shape}?", "yes" if yes else "no"
    if kind == "count":
        shape = str(rng.choice(SHAPES))
        return f"How many {shape}s are there?", str(len(by_shape[shape]))
    if kind == "where":
        pairs = [(o.color, o.shape) for o in objects]
        unique = [o for o in objects if pairs.count((o.color, o.shape)) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"Where is the {o.color} {o.shape}?", o.quadrant
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def covers(o: Obj, x: float, y: float) -> bool:
    """Whether the drawn shape ``o`` covers the point (x, y)."""
    r = o.size // 2
    dx, dy = x - o.cx, y - o.cy
    if o.shape == "square":
        return abs(dx) <= r and abs(dy) <= r
    if o.shape == "circle":
        return dx * dx + dy * dy <= r * r
    return -r <= dy <= r and abs(dx) <= (dy + r) / 2  # apex up, base at cy + r


PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24


def patch_labels(objects: tuple[Obj, ...]) -> np.ndarray:
    """(4, 24, 24) per-patch facts of the scene, read at each patch's centre: shape (0 = none,
    1.. = SHAPES), colour (0 = none, 1.. = COLORS), quadrant of the object's centre (0 = none,
    1.. = QUADRANTS), and 1 where the patch holds the object's centre. Used only as an auxiliary
    training signal for the vision tower (see shapes/train.py)."""
    labels = np.zeros((4, GRID, GRID), dtype=np.int64)
    colors = list(COLORS)
    for o in objects:
        for row in range(GRID):
            for col in range(GRID):
                if covers(o, col * PATCH + PATCH / 2, row * PATCH + PATCH / 2):
                    labels[0, row, col] = SHAPES.index(o.shape) + 1
                    labels[1, row, col] = colors.index(o.color) + 1
                    labels[2, row, col] = QUADRANTS.index(o.quadrant) + 1
        labels[3, o.cy // PATCH, o.cx // PATCH] = 1
    return labels


def _word_key(word: str) -> str:
    """A question word as the scene names it: "Circles?" -> "circle"."""
    return word.strip("?.,").lower().removesuffix("s")


def naming_end(question: str) -> int:
    """Characters of ``question`` through its last word naming a shape or colour (0: none): from
    there on, a reader of the question knows which objects it is about."""
    end = pos = 0
    for word in question.split():
        pos = question.index(word, pos) + len(word)
        if _word_key(word) in (*SHAPES, *COLORS):
            end = pos - (len(word) - len(word.rstrip("?.,")))
    return end


def named_objects(question: str, objects: tuple[Obj, ...]) -> tuple[Obj, ...]:
    """The objects a question is about: those of the shape and/or colour it names."""
    words = {_word_key(w) for w in question.split()}
    shape = next((s for s in SHAPES if s in words), None)
    color = next((c for c in COLORS if c in words), None)
    return tuple(o for o in objects if shape in (None, o.shape) and color in (None, o.color))


def sample(split: str, index: int, kind: str | None = None) -> Sample:
    """Sample ``index`` of ``split``; the question type cycles so every type is equally common."""
    rng = np.random.default_rng([SPLITS[split], index])
    kind = kind or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:  # redraw the scene until it can pose this kind of question (a few tries at most)
        objects = random_scene(rng)
        qa = _ask(kind, objects, rng)
        if qa is not None:
            return Sample(render(objects, rng), objects, kind, *qa)


def follow_ups(
    split: str, index: int, objects: tuple[Obj, ...], rounds: int = 1
) -> list[tuple[str, str]]:
    """Further (question, answer) turns about sample ``index``'s scene (multi-turn training
    conversations): per round, one question of each type the scene can pose, in a seeded order;
    no question twice. Round 1 does not depend on ``rounds``."""
    rng = np.random.default_rng([SPLITS[split], index, 1])
    turns: list[tuple[str, str]] = []
    for _ in range(rounds):
        for kind in rng.permutation(QUESTION_TYPES):
            qa = _ask(str(kind), objects, rng)
            if qa is not None and qa not in turns:
                turns.append(qa)
    return turns


def chat_prompt(processor, question: str) -> str:
    """The served single-turn prompt text: one user turn, the image then the question."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def chat_inputs(processor, s: Sample):
    """``s`` as HF transformers model inputs (input_ids, pixel_values, ...), batch of one."""
    return processor(images=s.image, text=chat_prompt(processor, s.question), return_tensors="pt")


def first_word(text: str) -> str:
    """The assistant's answer as scored: its first word, lower-cased, without punctuation."""
    words = text.strip().split()
    return words[0].strip(".,!?;:\"'").lower() if words else ""


def main() -> None:
    """``python -m shapes.task [--split test] [--index 0] [--out picture.png]``: one sample."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--split", choices=list(SPLITS), default="test")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--out", default="picture.png")
    args = parser.parse_args()
    s = sample(args.split, args.index)
    s.image.save(args.out)
    print(f"{args.out}: {s.question} -> {s.answer}")  # noqa: T201


if __name__ == "__main__":
    main()
