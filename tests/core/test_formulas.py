"""Hand-computed cases for every formula of the core (expected values written out)."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_plugin import core


def test_raters_above_mean_relevance():
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
    # logits per visual row: [2, 0, 0] -> softmax = [e²,1,1]/(e²+2)
    e2 = math.exp(2)
    expected = torch.tensor([e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)])
    assert torch.allclose(core.text_relevance(visual, text), expected, atol=1e-6)
    assert core.select_raters(visual, text).tolist() == [0]


@pytest.mark.parametrize("n_text", [0, 1])
def test_raters_fallback_never_empty_or_nan(n_text):
    visual = torch.randn(5, 4)
    text = torch.randn(n_text, 4)
    assert core.select_raters(visual, text).tolist() == list(range(n_text))


def test_raters_all_equal_fall_back_to_all_text():
    assert core.select_raters(torch.ones(3, 2), torch.ones(4, 2)).tolist() == [0, 1, 2, 3]


def test_rater_attention_is_causal_post_softmax_on_visual_columns():
    # one head, dh = 1, L = 4 keys; visual = positions 1..2; rater at position 2 sees keys 0..2
    q = torch.tensor([[[1.0]]])
    k = torch.tensor([[[0.0], [1.0], [2.0], [9.0]]])
    probs = core.rater_attention(q, k, torch.tensor([2]), slice(1, 3), scale=1.0)
    z = 1 + math.e + math.e**2
    assert probs.shape == (1, 1, 2)
    assert torch.allclose(probs[0, 0], torch.tensor([math.e / z, math.e**2 / z]), atol=1e-6)


def test_rater_attention_gqa_shares_kv_heads():
    q = torch.randn(4, 3, 8)
    k = torch.randn(2, 10, 8)
    pos = torch.tensor([7, 8, 9])
    probs = core.rater_attention(q, k, pos, slice(2, 6))
    ref = core.rater_attention(q[2:3], k[1:2], pos, slice(2, 6))
    assert torch.allclose(probs[2:3], ref)


def test_scores_v15_mean_and_head_mass():
    probs = torch.tensor([[[0.1, 0.3], [0.2, 0.2]], [[0.5, 0.1], [0.0, 0.4]]])
    assert torch.allclose(core.score_v15(probs), torch.tensor([0.2, 0.25]))
    assert torch.allclose(core.head_mass(probs), torch.tensor([0.8, 1.0]))


def test_rope_gravity_is_two_cos_sum_over_pairs():
    # head_dim 4, theta 100: inverse frequencies 1 and 0.1; distance 3
    g = core.rope_gravity(torch.tensor([5]), torch.tensor([2]), 4, 100.0, scale=1.0)
    assert g.item() == pytest.approx(2 * math.cos(3) + 2 * math.cos(0.3), abs=1e-5)


def test_score_v2_divides_gravity_and_keeps_priority_heads():
    probs = torch.tensor([[[0.2, 0.2]], [[0.6, 0.0]], [[0.1, 0.1]]])  # masses 0.4, 0.6, 0.2
    gravity = torch.tensor([[2.0, 1.0]])
    # top-2 heads are 1 and 0: ((0.6/2 + 0.2/2)/2, (0.0 + 0.2)/2)
    assert torch.allclose(core.score_v2(probs, gravity, heads=2), torch.tensor([0.2, 0.1]))


def test_gravity_guard_floors_near_zero_terms():
    guarded = core.guard_gravity(torch.tensor([[4.0, 0.0, -1e-9, -2.0]]))
    assert guarded.tolist() == [pytest.approx([4.0, 0.04, 0.04, 2.0])]


def test_reference_stage_lists():
    assert core.PRUNE_LAYERS == (2, 6, 15)
    assert core.STAGE_LISTS["v1.5"] == {
        192: (300, 200, 110),
        128: (303, 110, 36),
        96: (238, 48, 26),
        64: (66, 30, 17),
    }
    assert core.STAGE_LISTS["v2"] == {
        192: (300, 200, 118),
        128: (238, 108, 60),
        96: (246, 54, 28),
        64: (66, 34, 20),
    }
    assert core.stage_keep(300, 576) == 300 and core.stage_keep(300, 250) == 249


@pytest.mark.parametrize(
    ("deleted", "clusters"),
    [(0, 0), (1, 1), (9, 1), (29, 1), (30, 2), (33, 2), (276, 9), (109, 4), (94, 3)],
)
def test_recycle_cluster_rule(deleted, clusters):
    assert core.recycle_clusters(deleted) == clusters


def test_paper_192_setting_counts_309_204_113():
    counts, current = [], 576
    for listed in core.STAGE_LISTS["v1.5"][192]:
        keep = core.stage_keep(listed, current)
        current = keep + core.recycle_clusters(current - keep)
        counts.append(current)
    assert counts == [309, 204, 113]


@pytest.mark.parametrize(
    ("budget", "split"),
    [(64, (48, 16)), (128, (114, 14)), (192, (180, 12)), (36, (19, 17)), (19, (19, 0))],
)
def test_split_budget_single_stage(budget, split):
    assert core.split_budget(576, budget, recycle=True) == split
    assert core.split_budget(576, budget, recycle=False) == (budget, 0)
    assert core.split_budget(576, 600, recycle=True) == (576, 0)


def test_budget_schedule_ends_exactly_at_budget():
    plan = core.budget_schedule(576, 113, stages=3, recycle=True)
    assert plan == [(327, 8), (189, 5), (110, 3)]


def test_adaptive_rank_rule():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])  # rank 2
    assert core.adaptive_keep(probs, scale=1.0, bias=1.0, num_visual=4) == 3
    assert core.adaptive_keep(probs, scale=9.0, bias=6.0, num_visual=4) == 3  # capped at Nv - 1
    assert core.adaptive_keep(probs, scale=1.0, bias=0.0, num_visual=2) is None  # Nv == rank


def test_dpc_knn_two_obvious_groups_and_mean_merge():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [10.1, 10.0]])
    assign = core.dpc_knn_clusters(x, 2)
    assert assign[0] == assign[1] == assign[2] != assign[3] == assign[4]
    merged = core.recycle_tokens(x, torch.ones(5), torch.arange(5), clusters=2, tau=1.0)
    assert sorted(merged[:, 0].tolist()) == pytest.approx([1 / 30, 10.05], abs=1e-5)


def test_select_keeps_top_scores_in_original_order():
    visual = torch.arange(12.0).view(6, 2)
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0, 0.7])
    sel = core.select_visual_tokens(visual, scores, 3, recycle=False)
    assert sel.kept.tolist() == [1, 3, 5] and sel.recycled.shape == (0, 2)


def test_uniform_grid_and_random_baselines():
    assert core.uniform_indices(16, 4, (4, 4)).tolist() == [0, 3, 12, 15]
    assert core.random_indices(10, 3, seed=0).tolist() == core.random_indices(10, 3).tolist()
    assert core.random_indices(576, 64).unique().numel() == 64
