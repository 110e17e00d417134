"""The shapes task generator: seeded, splits disjoint, every answer true of the drawn scene."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from shapes.task import (
    COLORS,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    QUADRANTS,
    QUESTION_TYPES,
    SHAPES,
    first_word,
    sample,
)

N = 300


@pytest.fixture(scope="module")
def samples():
    return [sample("test", i) for i in range(N)]


def test_same_index_same_sample_and_splits_differ():
    a, b = sample("val", 7), sample("val", 7)
    assert a.question == b.question and a.objects == b.objects
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    firsts = {split: [sample(split, i).objects for i in range(20)] for split in ("train", "val")}
    assert not set(firsts["train"]) & set(firsts["val"])


def test_scenes_follow_the_spec(samples):
    for s in samples:
        assert s.image.size == (IMAGE_SIZE, IMAGE_SIZE) and s.image.mode == "RGB"
        assert 3 <= len(s.objects) <= 6
        for o in s.objects:
            assert o.shape in SHAPES and o.color in COLORS
            assert MIN_SIZE <= o.size <= MAX_SIZE
            r = o.size // 2
            assert r <= o.cx <= IMAGE_SIZE - r and r <= o.cy <= IMAGE_SIZE - r
        for i, o in enumerate(s.objects):  # bounding squares never overlap
            for p in s.objects[i + 1 :]:
                gap_x = abs(o.cx - p.cx) - (o.size // 2 + p.size // 2)
                gap_y = abs(o.cy - p.cy) - (o.size // 2 + p.size // 2)
                assert max(gap_x, gap_y) > 0


def test_every_answer_is_true_of_the_scene(samples):
    for s in samples:
        words = s.question.rstrip("?").split()
        objs = s.objects
        if s.kind == "color":  # What color is the {shape}?
            (match,) = [o for o in objs if o.shape == words[-1]]
            assert s.answer == match.color
        elif s.kind == "shape":  # What shape is the {color} object?
            (match,) = [o for o in objs if o.color == words[-2]]
            assert s.answer == match.shape
        elif s.kind == "exists":  # Is there a {color} {shape}?
            present = any(o.color == words[-2] and o.shape == words[-1] for o in objs)
            assert s.answer == ("yes" if present else "no")
        elif s.kind == "count":  # How many {shape}s are there?
            shape = words[2].removesuffix("s")
            assert s.answer == str(sum(o.shape == shape for o in objs))
        else:  # Where is the {color} {shape}?
            (match,) = [o for o in objs if (o.color, o.shape) == (words[-2], words[-1])]
            assert s.answer == match.quadrant and s.answer in QUADRANTS


def test_pixels_show_the_named_object(samples):
    """The object's centre pixel has its colour (pure hue ± jitter), the corners the background."""
    for s in samples[:60]:
        px = np.asarray(s.image).astype(int)
        for o in s.objects:
            centre = px[o.cy + (o.size // 4 if o.shape == "triangle" else 0), o.cx]
            assert np.abs(centre - np.array(COLORS[o.color])).max() <= 20, (s.question, o)
        assert px[0, 0].min() >= 214


def test_question_types_are_balanced(samples):
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == set(QUESTION_TYPES)
    assert max(kinds.values()) - min(kinds.values()) <= 1
    yes = sum(s.answer == "yes" for s in samples if s.kind == "exists")
    assert 0.35 < yes / kinds["exists"] < 0.65


@pytest.mark.parametrize(
    ("text", "word"),
    [(" Red.", "red"), ("top-left, I think", "top-left"), ("\n3", "3"), ("", ""), ("Yes!", "yes")],
)
def test_first_word_scoring(text, word):
    assert first_word(text) == word
