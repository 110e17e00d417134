"""Coverage-aware selection (relevance-conditioned DPP, core/coverage.py): hand-computed cases
and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_plugin import core
from sparse_plugin.contract import KnobError, parse_knob

FAST = settings(max_examples=60, deadline=None)


def two_clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens 0-4: object A (most attended); 5-9: object B (attended a little less); 10-29:
    background. Within an object the tokens are near-duplicates."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    features = torch.cat(
        [a + 0.01 * torch.randn(5, 16, generator=g), b + 0.01 * torch.randn(5, 16, generator=g),
         torch.randn(20, 16, generator=g)]
    )  # fmt: skip
    scores = torch.cat([1.0 + 0.01 * torch.arange(5), 0.8 + 0.01 * torch.arange(5),
                        0.1 * torch.rand(20, generator=g)])  # fmt: skip
    return features, scores


def test_top_k_takes_one_object_coverage_takes_both():
    features, scores = two_clusters()
    assert core.top_k_sorted(scores, 4).tolist() == [1, 2, 3, 4]  # all on object A
    kept = core.coverage_indices(features, scores, 4, coverage=0.1).tolist()
    assert any(i < 5 for i in kept) and any(5 <= i < 10 for i in kept), kept
    assert all(i < 10 for i in kept), kept  # and still nothing from the background


def test_small_coverage_is_top_k_and_full_coverage_ignores_relevance():
    features, scores = two_clusters()
    assert (
        core.coverage_indices(features, scores, 6, 1e-4).tolist()
        == core.top_k_sorted(scores, 6).tolist()
    )
    reversed_scores = scores.flip(0)
    assert (
        core.coverage_indices(features, scores, 6, 1.0).tolist()
        == core.coverage_indices(features, reversed_scores, 6, 1.0).tolist()
    )


def test_on_a_grid_alike_tokens_far_apart_are_different_objects():
    # 6x6 grid, two red 2x2 blobs with identical features and scores: top-K ties take the
    # earliest tokens (one blob); with the grid term, coverage puts a token on each blob.
    features = torch.zeros(36, 2)
    features[:, 1] = 1.0  # background
    blob_a = [0, 1, 6, 7]
    blob_b = [28, 29, 34, 35]
    scores = torch.zeros(36)
    for i in blob_a + blob_b:
        features[i] = torch.tensor([1.0, 0.0])
        scores[i] = 1.0
    assert core.top_k_sorted(scores, 2).tolist() == [0, 1]
    kept = core.coverage_indices(features, scores, 2, 0.3, grid=(6, 6)).tolist()
    assert kept[0] in blob_a and kept[1] in blob_b, kept
    # without the grid the blobs are one "object": coverage then leaves the second for background
    flat = core.coverage_indices(features, scores, 2, 0.3).tolist()
    assert not (set(flat) & set(blob_b)), flat


def test_duplicates_are_worth_little_once_one_is_kept():
    # token 1 duplicates token 0 exactly; token 2 is a different object scored a little lower
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    scores = torch.tensor([1.0, 1.0, 0.9, 0.0])
    assert core.coverage_indices(features, scores, 2, 0.5).tolist() == [0, 2]
    assert core.top_k_sorted(scores, 2).tolist() == [0, 1]


@FAST
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 350),
    c=st.floats(0.01, 1.0),
    seed=st.integers(0, 99),
)
def test_exact_count_sorted_unique_deterministic(n, k, c, seed):
    g = torch.Generator().manual_seed(seed)
    features, scores = torch.randn(n, 8, generator=g), torch.rand(n, generator=g)
    kept = core.coverage_indices(features, scores, k, c)
    assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == min(k, n)
    assert torch.equal(kept, core.coverage_indices(features, scores, k, c))


@FAST
@given(n=st.integers(2, 200), k=st.integers(1, 250), seed=st.integers(0, 99))
def test_with_recycling_the_budget_stays_exact(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    visual, scores = torch.randn(n, 8, generator=g), torch.rand(n, generator=g)
    sel = core.select_visual_tokens(visual, scores, k, recycle=True, coverage=0.3)
    assert len(sel.kept) + len(sel.recycled) == min(k, n)


def test_bf16_agrees_with_fp32_on_well_separated_inputs():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(8, 64, generator=g) * 4
    features = centres.repeat_interleave(8, 0) + 0.05 * torch.randn(64, 64, generator=g)
    scores = torch.linspace(1.0, 0.0, 64)  # steps of 1/63, well above bf16's rounding
    fp32 = core.coverage_indices(features, scores, 8, 0.3)
    bf16 = core.coverage_indices(features.bfloat16(), scores.bfloat16(), 8, 0.3)
    assert torch.equal(fp32, bf16)
    top = core.top_k_sorted(scores, 8)
    assert len({int(i) // 8 for i in fp32}) > len({int(i) // 8 for i in top})  # spread wider


@pytest.mark.parametrize(
    ("knob", "words"),
    [
        ({"visual_tokens": 8, "coverage": -0.1}, "sparsevlm.coverage: Input should be greater"),
        ({"visual_tokens": 8, "coverage": 1.5}, "sparsevlm.coverage: Input should be less than"),
        ({"visual_tokens": 8, "coverage": 0.3, "method": "random"}, "sparsevlm.coverage: Value"),
        ({"visual_tokens": 8, "coverage": "0.3"}, "sparsevlm.coverage"),
    ],
)
def test_bad_coverage_names_the_field(knob, words):
    with pytest.raises(KnobError, match="coverage") as err:
        parse_knob(knob)
    assert words in str(err.value)
