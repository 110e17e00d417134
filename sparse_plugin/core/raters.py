"""Raters: the text tokens after the image that judge which visual tokens matter (paper §3.1)."""

from __future__ import annotations

import torch
from torch import Tensor


def text_relevance(visual: Tensor, text: Tensor) -> Tensor:
    """r = softmax(V·Tᵀ over text).mean(over visual): (Nv, d), (Nt, d) -> (Nt,) float32.

    Raw dot product, no 1/√d scaling, as in the reference code.
    """
    logits = visual.float() @ text.float().T  # (Nv, Nt)
    return logits.softmax(dim=-1).mean(dim=0)


def select_raters(visual: Tensor, text: Tensor) -> Tensor:
    """Indices (R,) of the rater tokens in ``text``, sorted; R >= 1 whenever Nt >= 1.

    Raters are the tokens whose relevance is above the mean relevance. When none is (all equal,
    e.g. a single text token), every text token rates: the reference would divide by zero.
    """
    if text.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=text.device)
    r = text_relevance(visual, text)
    raters = torch.nonzero(r > r.mean()).flatten()
    if raters.numel() == 0:
        return torch.arange(text.shape[0], device=text.device)
    return raters
