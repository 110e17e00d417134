"""Coverage-aware selection: spread the budget over the relevant content, not onto its peak.

Top-K by attention piles the budget onto the few most salient patches; a question such as "how
many circles?" needs a token on *every* circle. Here the relevance scores decide what matters
and a determinantal term decides how the budget spreads over it (a relevance-conditioned DPP,
as in CDPruner, solved by greedy MAP inference):

    S_ij = cos(x_i, x_j)·G_ij + ε·[i = j]     similarity of the visual tokens (PSD)
    G_ij = exp(−|p_i − p_j|² / 2σ²)            closeness on the image's token grid, where known;
                                               σ = ½·√(rows·cols / K), half the spacing of K
                                               tokens spread evenly (G = 1 without a grid)
    z_i  = (s_i − mean s) / std s              standardised relevance scores
    L    = diag(q) S diag(q),  q_i = exp(α z_i / 2),  α = (1 − c) / c

    kept = greedy argmax over |K'| = K of  log det L_K' = α Σ_{i∈K'} z_i + log det S_K'

``c`` (the knob's ``coverage``, 0 < c ≤ 1) trades relevance against spread: c → 0 is plain
top-K, c = 1 pure diversity (DivPrune-like). Two near-duplicate tokens make S_K' nearly
singular, so the second one is worth little once the first is kept; a token on an object not yet
covered is worth its relevance. The grid term makes "duplicate" mean "alike *and* close": two
circles of the same colour are different objects, two patches of one circle are not. Greedy
MAP (Chen et al., 2018) keeps one Cholesky row per pick: O(K·N·(K + d)) time and O(K·N)
memory, never the N×N kernel or an O(N³) factorisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

RIDGE = 1e-3  # ε: keeps S positive definite when the features span fewer than K directions


def coverage_indices(
    features: Tensor,
    scores: Tensor,
    k: int,
    coverage: float,
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """(N, d) features, (N,) relevance -> (min(k, N),) sorted indices chosen by greedy DPP MAP.

    ``grid``: (rows, cols) of the tokens in row-major order, when they form one image grid.

    Deterministic: ties go to the earlier token; computed in float32 whatever the input dtype.
    """
    n = features.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    x = torch.nn.functional.normalize(features.float(), dim=-1)  # (N, d)
    s = scores.float()
    z = (s - s.mean()) / s.std().clamp_min(1e-12) if n > 1 else torch.zeros_like(s)
    alpha = (1.0 - coverage) / coverage
    where = _grid_coords(grid, n, features.device)  # (N, 2) or None
    sigma2 = 0.25 * n / k if where is not None else 0.0  # σ² = (½·√(N/K))²
    # L = QSQ factorises: a candidate's det gain under L is q_i² times its gain under S, so the
    # greedy runs on S and ranks by α·z_i + log(gain_i): no exp overflow for small c.
    gain = torch.full((n,), 1.0 + RIDGE, device=features.device)  # Schur residuals of S
    rows = torch.zeros(k, n, dtype=torch.float32, device=features.device)  # Cholesky rows
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    for step in range(k):
        value = alpha * z + torch.log(gain.clamp_min(1e-30))
        pick = int(torch.where(taken, float("-inf"), value).argmax())  # first max: earlier wins
        taken[pick] = True
        if step == k - 1:
            break
        s_row = x @ x[pick]  # (N,) S_{pick,·}
        if where is not None:
            s_row = s_row * torch.exp(-((where - where[pick]) ** 2).sum(-1) / (2 * sigma2))
        s_row[pick] += RIDGE
        e = (s_row - rows[:step].T @ rows[:step, pick]) / gain[pick].sqrt()
        rows[step] = e
        gain = (gain - e * e).clamp_min(0.0)
    return torch.nonzero(taken).flatten()


def _grid_coords(grid: tuple[int, int] | None, n: int, device: torch.device) -> Tensor | None:
    if grid is None or grid[0] * grid[1] != n:
        return None
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
