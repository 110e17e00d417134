"""Temporal redundancy of a video's tokens: what repeats the same place in the previous frame.

A video's visual tokens are frames of the same (h, w) token grid, row-major, frame after frame.
Most of a video does not change between frames; a token that repeats the token at its place in
the previous frame adds little (the EVS / VidCom2 observation). Two uses, both query-agnostic:

- ``temporal_indices``: the EVS-like baseline: keep the K tokens that changed most (the first
  frame counts as all new), nothing else considered.
- ``novel_candidates``: the stage SparseVLM runs *before* its text-guided ranking: repeats (cosine
  similarity ≥ threshold) drop out of the candidates, so the question's budget is not spent on
  ten copies of one static patch.
"""

from __future__ import annotations

import torch
from torch import Tensor

VideoGrid = tuple[int, int, int]  # (frames, rows, cols) of the tokens, row-major per frame


def repeat_similarity(features: Tensor, grid: VideoGrid) -> Tensor:
    """(N, d) tokens of a (t, h, w) grid -> (N,) cosine similarity of each token to the token at
    its place in the previous frame; -1 (nothing to repeat) for the first frame."""
    t, h, w = grid
    if t * h * w != features.shape[0]:
        raise ValueError(f"video grid {grid} does not match its {features.shape[0]} tokens")
    x = torch.nn.functional.normalize(features.float(), dim=-1).view(t, h * w, -1)  # (t, hw, d)
    sim = torch.full((t, h * w), -1.0, device=features.device)
    if t > 1:
        sim[1:] = (x[1:] * x[:-1]).sum(-1)
    return sim.flatten()


def temporal_indices(features: Tensor, grid: VideoGrid, k: int) -> Tensor:
    """The min(k, N) tokens least like their previous frame, sorted; ties go to the earlier."""
    change = -repeat_similarity(features, grid)
    order = torch.sort(change, descending=True, stable=True).indices
    return order[: min(k, features.shape[0])].sort().values


def novel_candidates(features: Tensor, grid: VideoGrid, threshold: float) -> Tensor:
    """(N,) bool: tokens that are *not* repeats (similarity to the previous frame < threshold)."""
    return repeat_similarity(features, grid) < threshold
