"""Token recycling: merge the best of the pruned tokens back as cluster means (DPC-kNN, §3.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from .budget import RECYCLE_TAU


def dpc_knn_clusters(x: Tensor, clusters: int) -> Tensor:
    """Density-peak clustering with k-NN density: (M, d) -> (M,) cluster id in 0..clusters-1.

    distance = L2/√d; ρ = exp(−mean squared distance to the k = ``clusters`` nearest tokens,
    self included); δ = distance to the nearest denser token (the largest distance for the
    densest); centres = top-C of ρ·δ; every token joins its nearest centre. Ties in ρ are broken
    by index (a tiny deterministic ramp instead of the reference's random noise).
    """
    m, d = x.shape
    clusters = min(clusters, m)
    xf = x.float()
    dist = torch.cdist(xf, xf) / d**0.5  # (M, M)
    k = min(clusters, m)
    knn = dist.topk(k, dim=-1, largest=False).values
    density = torch.exp(-(knn**2).mean(dim=-1))
    density = density + torch.arange(m, device=x.device, dtype=density.dtype) * 1e-6 * float(
        density.max()
    )
    denser = density[None, :] > density[:, None]  # (M, M): j denser than i
    far = dist.max()
    delta = torch.where(denser, dist, far).min(dim=-1).values
    delta = torch.where(denser.any(dim=-1), delta, dist.max(dim=-1).values)
    centres = torch.topk(density * delta, clusters).indices
    assign = dist[:, centres].argmin(dim=-1)
    assign[centres] = torch.arange(clusters, device=x.device)
    return assign


def recycle_tokens(
    hidden: Tensor, scores: Tensor, deleted: Tensor, clusters: int, tau: float = RECYCLE_TAU
) -> Tensor:
    """(clusters, d) merged tokens from the deleted ones.

    Args:
        hidden: (N, d) token states (embeddings in serving; layer outputs in the reference).
        scores: (N,) importance scores.
        deleted: (D,) indices of the pruned tokens.
        clusters: C, how many merged tokens to return.
    """
    if clusters <= 0 or deleted.numel() == 0:
        return hidden[:0]
    top = min(int(tau * deleted.numel()) + 1, deleted.numel())
    pool = deleted[torch.topk(scores[deleted].float(), top).indices.sort().values]  # (Lr,)
    clusters = min(clusters, pool.numel())
    assign = dpc_knn_clusters(hidden[pool], clusters)
    sums = torch.zeros(clusters, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, assign, hidden[pool].float())
    counts = torch.bincount(assign, minlength=clusters).clamp_min(1)
    return (sums / counts[:, None]).to(hidden.dtype)
