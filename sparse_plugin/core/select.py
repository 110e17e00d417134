"""The one entry point: from scores and a budget K to exactly K tokens per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .budget import split_budget
from .coverage import coverage_indices
from .recycle import recycle_tokens


@dataclass(frozen=True)
class Selection:
    kept: Tensor  # (k,) long, sorted ascending, unique: indices into the image's visual tokens
    recycled: Tensor  # (c, d) merged tokens, dtype/device of the visual tokens; k + c == min(K, N)


def top_k_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best scores in original (spatial) order; ties go to the earlier token."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def select_visual_tokens(
    visual: Tensor,
    scores: Tensor,
    budget: int,
    recycle: bool,
    coverage: float | None = None,
    features: Tensor | None = None,
    grid: tuple[int, int] | None = None,
    candidates: Tensor | None = None,
) -> Selection:
    """(N, d) tokens, (N,) scores -> Selection of exactly min(K, N) tokens.

    ``coverage`` (0 < c ≤ 1): keep by relevance-conditioned DPP over ``features`` (default the
    tokens themselves; ``grid`` their (rows, cols) layout, if any) instead of plain top-K
    (coverage.py). ``candidates`` ((N,) bool, e.g. a video's non-repeats, temporal.py): the
    kept tokens come from these first; the rest only fill what the budget still needs, by
    score.
    """
    n = visual.shape[0]
    if budget >= n:
        return Selection(torch.arange(n, device=visual.device), visual[:0])
    kept_n, clusters = split_budget(n, budget, recycle)
    feats = visual if features is None else features
    if candidates is not None and not bool(candidates.all()):
        kept = _kept_among(feats, scores, kept_n, coverage, candidates.to(scores.device))
    elif coverage:
        kept = coverage_indices(feats, scores, kept_n, coverage, grid)
    else:
        kept = top_k_sorted(scores, kept_n)
    mask = torch.ones(n, dtype=torch.bool, device=visual.device)
    mask[kept] = False
    recycled = recycle_tokens(visual, scores, torch.nonzero(mask).flatten(), clusters)
    return Selection(kept, recycled)


def _kept_among(
    features: Tensor, scores: Tensor, k: int, coverage: float | None, candidates: Tensor
) -> Tensor:
    """k indices chosen from ``candidates`` first (by coverage or top-K), topped up by score."""
    pool = torch.nonzero(candidates).flatten()
    if pool.numel() >= k:
        if coverage:
            local = coverage_indices(features[pool], scores[pool], k, coverage)
        else:
            local = top_k_sorted(scores[pool], k)
        return pool[local].sort().values
    rest = torch.nonzero(~candidates).flatten()
    extra = rest[top_k_sorted(scores[rest], k - pool.numel())]
    return torch.cat([pool, extra]).sort().values


def select_images(
    visuals: list[Tensor], scores: list[Tensor], budgets: list[int], recycle: bool
) -> list[Selection]:
    """Images of different token counts, each with its own budget: one Selection per image.

    Selection is per image by design (no padding across images), so a batch equals one-by-one.
    """
    return [
        select_visual_tokens(v, s, k, recycle)
        for v, s, k in zip(visuals, scores, budgets, strict=True)
    ]


def uniform_indices(num_visual: int, budget: int, grid: tuple[int, int] | None = None) -> Tensor:
    """K indices spread evenly: over the rows × cols grid when given, else along the sequence."""
    budget = min(budget, num_visual)
    if grid is None or grid[0] * grid[1] != num_visual:
        return torch.linspace(0, num_visual - 1, budget).round().long().unique()
    rows, cols = grid
    # a near-square sub-grid of ≥ K points, then the K closest to evenly spaced ranks
    side_r = max(1, round((budget * rows / cols) ** 0.5))
    side_c = max(1, -(-budget // side_r))
    r = torch.linspace(0, rows - 1, min(side_r, rows)).round().long()
    c = torch.linspace(0, cols - 1, min(side_c, cols)).round().long()
    points = (r[:, None] * cols + c[None, :]).flatten().unique()
    if points.numel() < budget:  # top up along the sequence
        extra = torch.ones(num_visual, dtype=torch.bool)
        extra[points] = False
        fill = torch.nonzero(extra).flatten()
        pick = torch.linspace(0, fill.numel() - 1, budget - points.numel()).round().long()
        points = torch.cat([points, fill[pick]]).sort().values
    pick = torch.linspace(0, points.numel() - 1, budget).round().long()
    return points[pick]


def random_indices(num_visual: int, budget: int, seed: int = 0) -> Tensor:
    """K distinct indices drawn uniformly with a fixed seed (reproducible A/B baseline)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_visual, generator=g)[: min(budget, num_visual)].sort().values
