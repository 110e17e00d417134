"""A bounded LRU of vision-tower outputs in the worker, keyed by the image's content.

A pruned image's multimodal hash includes its text, so when the text changes (prompt scope, or a
new conversation about a known image) vLLM's encoder cache misses and the whole encoder step runs
again. Its vision-tower half depends on the image alone: this cache keeps it (the projected
features, before selection), so a known image costs only the scoring probe and the prefill.
Entries live in host memory, outside the GPU memory vLLM has profiled and reserved.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

CACHE_ENV = "SPARSEVLM_VISION_CACHE_MB"
DEFAULT_MB = 512


def capacity_from_env() -> int:
    """Capacity in bytes from $SPARSEVLM_VISION_CACHE_MB (0 disables the cache)."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_MB * 2**20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if mb < 0:
        raise ValueError(f"{CACHE_ENV} must be a size in MiB (0 disables the cache), got {raw!r}")
    return int(mb * 2**20)


class VisionCache:
    """Least-recently-used map from a content key to a (N, d) feature tensor, bounded in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.capacity or key in self._entries:
            return
        while self.used + size > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        stored = features.detach().to("cpu")
        if stored.data_ptr() == features.data_ptr():  # already on the host: keep a private copy
            stored = stored.clone()
        self._entries[key] = stored
        self.used += size
