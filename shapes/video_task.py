"""The shapes *video* task: busy clips in which each asked-about object shows up briefly, somewhere.

A clip is ``STEPS`` scenes on an 8 x 8 grid of 28-pixel cells (one Qwen2.5-VL video token each),
each scene shown for 2 frames (Qwen2.5-VL pairs frames into one temporal token). Ten distractors
(yellow, cyan, magenta, white) wander one cell every scene, so most of the clip changes all the
time. Three targets, one red, one green, one blue, each appear once, at a random scene and cell,
for 1 or 2 scenes (moving one cell if 2), then vanish. Questions: "What shape is the red object?"
for each target; the answer (circle, square, triangle) is where and when that object appeared,
in 1-2 of the clip's 512 tokens.

Every clip is a pure function of (split, index): ``clip("test", 17)`` is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shapes.task import SHAPES, SPLITS

CELL = 28  # pixels of one video token (patch 14 x spatial merge 2)
GRID = 8  # cells a side: 224 x 224 frames
SIZE = CELL * GRID
STEPS = 8  # scenes; 16 frames
FRAMES_PER_STEP = 2  # Qwen2.5-VL's temporal patch: both frames of a token show the same scene
FPS = 2.0  # vLLM samples Qwen2.5-VL videos at 2 fps: a clip written at 2 fps keeps every frame
INSET = 3  # pixels between a shape and its cell's edge
TARGETS: dict[str, tuple[int, int, int]] = {"red": (255, 0, 0), "green": (0, 255, 0),
                                            "blue": (0, 0, 255)}  # fmt: skip
DISTRACTORS: dict[str, tuple[int, int, int]] = {
    "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}  # fmt: skip
N_DISTRACTORS = 10
Cell = tuple[int, int]  # (row, col)


@dataclass(frozen=True)
class Track:
    shape: str
    color: str
    cells: tuple[Cell | None, ...]  # per scene: where it is, None while absent

    @property
    def first_scene(self) -> int:
        return next(t for t, cell in enumerate(self.cells) if cell is not None)


@dataclass(frozen=True)
class Clip:
    tracks: tuple[Track, ...]

    def frames(self) -> list[Image.Image]:
        """The clip's RGB frames: STEPS scenes x FRAMES_PER_STEP."""
        return [self.scene(t) for t in range(STEPS) for _ in range(FRAMES_PER_STEP)]

    def scene(self, t: int) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        for track in self.tracks:
            if track.cells[t] is not None:
                colour = (TARGETS | DISTRACTORS)[track.color]
                draw_shape(draw, track.shape, track.cells[t], colour)
        return image

    def targets(self) -> list[Track]:
        """The asked-about objects, in TARGETS order (the order of ``questions``)."""
        return [t for t in self.tracks if t.color in TARGETS]

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) about each target."""
        return [(f"What shape is the {t.color} object?", t.shape) for t in self.targets()]

    def target(self, color: str) -> Track:
        return next(t for t in self.tracks if t.color == color)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cell: Cell, colour: tuple[int, ...]) -> None:
    """A shape filling ``cell`` less INSET on each side."""
    y0, x0 = cell[0] * CELL + INSET, cell[1] * CELL + INSET
    y1, x1 = (cell[0] + 1) * CELL - INSET - 1, (cell[1] + 1) * CELL - INSET - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)


def _step(rng: np.random.Generator, cell: Cell, taken: set[Cell]) -> Cell:
    """One cell up, down, left or right (a free one; stay if none is free)."""
    moves = [(cell[0] + dr, cell[1] + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    free = [c for c in moves if 0 <= c[0] < GRID and 0 <= c[1] < GRID and c not in taken]
    return free[int(rng.integers(len(free)))] if free else cell


def _free_cell(rng: np.random.Generator, taken: set[Cell]) -> Cell:
    while True:
        cell = (int(rng.integers(GRID)), int(rng.integers(GRID)))
        if cell not in taken:
            return cell


def clip(split: str, index: int) -> Clip:
    """Clip ``index`` of ``split`` (seeded by both; splits never share a seed)."""
    rng = np.random.default_rng([SPLITS[split], index, 19])
    occupied: list[set[Cell]] = [set() for _ in range(STEPS)]
    tracks = []
    for color in TARGETS:  # targets first: a brief appearance each
        duration = int(rng.integers(1, 3))
        start = int(rng.integers(0, STEPS - duration + 1))
        cells: list[Cell | None] = [None] * STEPS
        cell = _free_cell(rng, set().union(*occupied[start : start + duration]))
        for t in range(start, start + duration):
            if t > start:
                cell = _step(rng, cell, occupied[t])
            cells[t] = cell
            occupied[t].add(cell)
        tracks.append(Track(str(rng.choice(SHAPES)), color, tuple(cells)))
    names = list(DISTRACTORS)
    for i in range(N_DISTRACTORS):  # distractors: always there, always moving
        cell = _free_cell(rng, occupied[0])
        cells = []
        for t in range(STEPS):
            if t > 0:
                cell = _step(rng, cell, occupied[t])
                if cell in occupied[t]:  # boxed in: wait for a free cell
                    cell = _free_cell(rng, occupied[t])
            cells.append(cell)
            occupied[t].add(cell)
        tracks.append(Track(str(rng.choice(SHAPES)), names[i % len(names)], tuple(cells)))
    return Clip(tuple(tracks))
