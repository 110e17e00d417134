"""Video pieces of the algorithm core and the knob: temporal redundancy, candidates, budgets."""

from __future__ import annotations

import pytest
import torch

from sparse_plugin.contract import KnobError, SparsityKnob, parse_knob
from sparse_plugin.core import novel_candidates, repeat_similarity, select_visual_tokens
from sparse_plugin.core.temporal import temporal_indices


def static_video(t: int, h: int, w: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """(t·h·w, d) tokens of a video whose frames all repeat the first one."""
    frame = torch.randn(h * w, d, generator=torch.Generator().manual_seed(seed))
    return frame.repeat(t, 1)


def test_repeat_similarity_is_cosine_to_the_same_place_one_frame_back():
    x = torch.randn(3 * 2 * 2, 4)
    sim = repeat_similarity(x, (3, 2, 2))
    assert sim.shape == (12,) and torch.all(sim[:4] == -1)  # the first frame repeats nothing
    expected = torch.nn.functional.cosine_similarity(x[4:8], x[0:4], dim=-1)
    assert torch.allclose(sim[4:8], expected, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        repeat_similarity(x, (2, 2, 2))


def test_temporal_keeps_what_changes_and_the_first_frame():
    t, h, w = 4, 3, 3
    x = static_video(t, h, w)
    moved = 2 * h * w + 4  # frame 2, centre: something appears there
    x[moved] = torch.randn(8)
    kept = temporal_indices(x, (t, h, w), h * w + 1)
    # the first frame is all new, then the one token that changed; nothing static after it
    assert kept.tolist() == [*range(h * w), moved]
    assert temporal_indices(x, (t, h, w), 1000).tolist() == list(range(t * h * w))


def test_novel_candidates_drop_only_repeats_at_the_threshold():
    x = static_video(3, 2, 2)
    x[5] = -x[1]  # frame 1 reverses one token: similarity -1, not a repeat
    novel = novel_candidates(x, (3, 2, 2), threshold=0.9)
    assert novel.tolist() == [True] * 4 + [False, True, False, False] + [False, True, False, False]
    # frame 2's token 1 is back to frame 0's: unlike frame 1's, so new again


def test_selection_takes_the_candidates_first_then_tops_up_by_score():
    n = 10
    visual = torch.randn(n, 4)
    scores = torch.arange(n, dtype=torch.float32)  # later tokens score higher
    candidates = torch.zeros(n, dtype=torch.bool)
    candidates[[0, 2, 4]] = True
    # fewer candidates than the budget: all of them, the rest by score among non-candidates
    sel = select_visual_tokens(visual, scores, 5, False, candidates=candidates)
    assert sel.kept.tolist() == [0, 2, 4, 8, 9]
    # more candidates than the budget: the best-scored candidates only
    sel = select_visual_tokens(visual, scores, 2, False, candidates=candidates)
    assert sel.kept.tolist() == [2, 4]
    # all candidates: the plain selection
    everything = torch.ones(n, dtype=torch.bool)
    assert select_visual_tokens(visual, scores, 3, False, candidates=everything).kept.tolist() == [
        7,
        8,
        9,
    ]


def test_videos_take_their_own_budget_fields_else_the_image_ones():
    knob = SparsityKnob(visual_tokens=64, video_keep_ratio=0.25)
    assert knob.budget(576, "image") == 64 and knob.budget(2304, "video") == 576
    shared = SparsityKnob(keep_ratio=0.5)
    assert shared.budget(100, "image") == 50 and shared.budget(1000, "video") == 500
    only_video = SparsityKnob(video_tokens=100)
    assert not only_video.prunes("image") and only_video.prunes("video")
    assert only_video.budget(576, "image") == 576 and only_video.budget(576, "video") == 100
    capped = SparsityKnob(video_tokens=500, max_visual_tokens=200)
    assert capped.budget(1000, "video") == 200


def test_an_image_identity_ignores_the_video_fields():
    a = SparsityKnob(visual_tokens=64, video_tokens=100)
    b = SparsityKnob(visual_tokens=64, video_tokens=300, temporal_threshold=0.9)
    assert a.selection_identity("image") == b.selection_identity("image")
    assert a.selection_identity("video") != b.selection_identity("video")
    c = SparsityKnob(visual_tokens=64, video_tokens=100, temporal_threshold=0.9)
    assert a.selection_identity("video") != c.selection_identity("video")


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"video_tokens": 0}, "sparsevlm.video_tokens", "greater than or equal to 1"),
        ({"video_keep_ratio": 1.5}, "sparsevlm.video_keep_ratio", "less than or equal to 1"),
        ({"video_tokens": 5, "video_keep_ratio": 0.5}, "sparsevlm", "not both"),
        ({"method": "off", "video_tokens": 5}, "sparsevlm", "takes no video_tokens"),
        ({"keep_ratio": 0.5, "temporal_threshold": 0}, "sparsevlm.temporal_threshold", "greater"),
        (
            {"method": "random", "keep_ratio": 0.5, "temporal_threshold": 0.9},
            "sparsevlm.temporal_threshold",
            "needs method 'sparsevlm' or 'fastv'",
        ),
        ({"method": "temporal"}, "sparsevlm", "pruning needs a budget"),
        ({"video_tokens": "5"}, "sparsevlm.video_tokens", "valid integer"),
    ],
)
def test_bad_video_fields_name_themselves(raw, field, words):
    with pytest.raises(KnobError) as err:
        parse_knob(raw)
    assert f"{field}:" in str(err.value) and words in str(err.value)
