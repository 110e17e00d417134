"""Visual-token importance from rater attention: v1.5 (mean), v2 "SparseVLM+" (gravity, heads)."""

from __future__ import annotations

import torch
from torch import Tensor

GRAVITY_FLOOR = 1e-2
"""v2 divides by the RoPE gravity term; where |gravity| < FLOOR·max|gravity| the floor is used."""


def score_v15(probs: Tensor) -> Tensor:
    """(H, R, Nv) -> (Nv,): mean over heads and raters."""
    return probs.float().mean(dim=(0, 1))


def head_mass(probs: Tensor) -> Tensor:
    """(H, R, Nv) -> (H,): each head's total rater->visual attention (priority-head ranking)."""
    return probs.float().sum(dim=(1, 2))


def rope_gravity(
    query_pos: Tensor,
    key_pos: Tensor,
    head_dim: int,
    rope_theta: float,
    scale: float | None = None,
) -> Tensor:
    """(R,), (Nv,) -> (R, Nv): the logit all-ones q and k get after RoPE at those positions.

    Each rotary pair of ones contributes 2·cos(Δ·θ_j), so the term depends only on the relative
    distance Δ: it is RoPE's built-in distance bias, which v2 divides out.
    """
    inv_freq = rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    delta = (query_pos[:, None] - key_pos[None, :]).double()  # (R, Nv)
    logit = 2.0 * torch.cos(delta[..., None] * inv_freq.to(delta.device)).sum(-1)
    return (logit * (scale if scale is not None else head_dim**-0.5)).float()


def guard_gravity(gravity: Tensor) -> Tensor:
    """|gravity| floored at GRAVITY_FLOOR of its largest magnitude (the term can approach 0)."""
    mag = gravity.float().abs()
    return mag.clamp_min(GRAVITY_FLOOR * float(mag.max().clamp_min(1e-12)))


def score_v2(
    probs: Tensor, gravity: Tensor, heads: int = 14, head_ids: Tensor | None = None
) -> Tensor:
    """(H, R, Nv), (R, Nv) -> (Nv,): gravity-corrected attention of the priority heads.

    Priority heads are the ``heads`` heads with the largest raw rater->visual mass, unless
    ``head_ids`` gives them (the tensor-parallel seam chooses them globally).
    """
    corrected = probs.float() / guard_gravity(gravity)[None]
    if head_ids is None:
        head_ids = torch.topk(head_mass(probs), min(heads, probs.shape[0])).indices
    return corrected[head_ids].mean(dim=(0, 1))
