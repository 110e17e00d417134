"""How many visual tokens to keep: the reference's fixed lists, v1.0's rank rule, exact budgets."""

from __future__ import annotations

import torch
from torch import Tensor

PRUNE_LAYERS: tuple[int, ...] = (2, 6, 15)
"""LLaVA-1.5-7B (32 layers): prune after these layers (v1.5 / v2; v1.0 also after 19)."""

STAGE_LISTS: dict[str, dict[int, tuple[int, ...]]] = {
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
"""Per-stage keep counts of the reference code for each "equal tokens" setting."""

RECYCLE_TAU = 0.3
"""Share of the deleted tokens that are recycled (τ = 30 %)."""


def stage_keep(listed: int, current_visual: int) -> int:
    """Keep count at a fixed-list stage: min(list value, current − 1)."""
    return min(listed, current_visual - 1)


def adaptive_keep(probs: Tensor, scale: float, bias: float, num_visual: int) -> int | None:
    """v1.0 rank rule: keep min(int(rank·scale + bias), Nv − 1); None = skip this stage.

    ``probs`` is the (R, Nv) rater attention (heads averaged); rank is taken in float32.
    """
    rank = int(torch.linalg.matrix_rank(probs.float()))
    if num_visual - rank == 0:
        return None
    return min(int(rank * scale + bias), num_visual - 1)


def recycle_clusters(num_deleted: int, tau: float = RECYCLE_TAU) -> int:
    """Cluster count for D deleted tokens: Lr = int(τ·D) + 1 recycled, C = int(Lr/10) + 1."""
    if num_deleted <= 0:
        return 0
    return int((int(tau * num_deleted) + 1) / 10) + 1


def split_budget(num_visual: int, budget: int, recycle: bool) -> tuple[int, int]:
    """Single-stage split of a final budget K into (kept, clusters), kept + clusters == min(K, N).

    With recycling, ``kept`` is the largest k with k + C(N − k) == K (k + C(N − k) grows by 0 or
    1 per step of k, so it exists once K ≥ 1 + C(N − 1)). Where the rule would merge more
    tokens than it keeps (K < 36 for N = 576), the budget is all kept tokens instead.
    """
    budget = min(budget, num_visual)
    if budget >= num_visual or not recycle:
        return budget, 0
    for kept in range(budget, 0, -1):
        clusters = recycle_clusters(num_visual - kept)
        if kept + clusters == budget:
            return (kept, clusters) if clusters <= kept else (budget, 0)
        if kept + clusters < budget:
            break
    return budget, 0


def budget_schedule(
    num_visual: int, budget: int, stages: int = 3, recycle: bool = True
) -> list[tuple[int, int]]:
    """Per-stage (kept, clusters) that shrink N visual tokens to exactly K after the last stage.

    Stage targets fall geometrically from N to K (the reference's lists shrink roughly so).
    """
    budget = min(budget, num_visual)
    plan, current = [], num_visual
    for s in range(1, stages + 1):
        target = (
            budget if s == stages else round(num_visual * (budget / num_visual) ** (s / stages))
        )
        target = max(budget, min(target, current))
        kept, clusters = split_budget(current, target, recycle)
        plan.append((kept, clusters))
        current = kept + clusters
    return plan
