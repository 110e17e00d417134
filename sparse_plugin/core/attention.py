"""Post-softmax attention of the rater rows only (never the full L×L matrix)."""

from __future__ import annotations

import torch
from torch import Tensor


def rater_attention(
    q: Tensor, k: Tensor, query_pos: Tensor, visual: slice, scale: float | None = None
) -> Tensor:
    """Attention probabilities from the raters to the visual tokens.

    Args:
        q: (H, R, dh) rater queries after RoPE.
        k: (Hkv, L, dh) keys of the whole sequence after RoPE; Hkv divides H (GQA).
        query_pos: (R,) the raters' positions in 0..L-1; a rater sees keys at positions <= its own.
        visual: the visual tokens' span within 0..L-1.
        scale: logit scale, default 1/√dh.
    Returns:
        (H, R, Nv) float32 probabilities (softmax over all L keys, then the visual columns).
    """
    heads, _, dh = q.shape
    kv_heads, length, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=0)  # (H, L, dh)
    logits = (q.float() @ k.float().transpose(1, 2)) * (scale if scale is not None else dh**-0.5)
    future = torch.arange(length, device=q.device)[None, :] > query_pos.to(q.device)[:, None]
    logits = logits.masked_fill(future[None], float("-inf"))  # (H, R, L)
    return logits.softmax(dim=-1)[:, :, visual]
