"""The worker's vision-tower cache (bounded LRU) and the engine counters' cross-process export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from sparse_plugin.engine_metrics import ProcessCounters, SharedCountersCollector
from sparse_plugin.models._vision_cache import CACHE_ENV, VisionCache, capacity_from_env

MB = 2**20


def feats(rows: int = 256, value: float = 1.0) -> torch.Tensor:
    return torch.full((rows, 1024), value)  # 1 MiB of float32


def test_lru_keeps_the_most_recently_used_within_its_byte_budget():
    cache = VisionCache(3 * MB)
    for key in "abc":
        cache.put(key, feats())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", feats())  # evicts b, the least recently used
    assert cache.get("b") is None and len(cache) == 3 and cache.used == 3 * MB
    assert all(cache.get(k) is not None for k in "acd")


def test_entries_are_private_copies_and_oversize_items_are_not_stored():
    cache = VisionCache(2 * MB)
    x = feats()
    cache.put("x", x)
    x.zero_()  # the engine may reuse its buffer: the cached copy must not change
    assert torch.equal(cache.get("x"), feats())
    cache.put("big", feats(rows=768))  # 3 MiB > capacity
    assert cache.get("big") is None and cache.get("x") is not None
    assert VisionCache(0).get("x") is None


def test_capacity_from_the_environment(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert capacity_from_env() == 512 * MB
    monkeypatch.setenv(CACHE_ENV, "0")
    assert capacity_from_env() == 0
    monkeypatch.setenv(CACHE_ENV, "1.5")
    assert capacity_from_env() == int(1.5 * MB)
    for bad in ("lots", "-1"):
        monkeypatch.setenv(CACHE_ENV, bad)
        with pytest.raises(ValueError, match=f"{CACHE_ENV} must be a size in MiB"):
            capacity_from_env()


def test_counters_of_several_processes_are_summed_on_scrape(tmp_path):
    mine = ProcessCounters(tmp_path)
    mine.inc("sparsevlm_engine_vision_cache_misses", "m", 2)
    mine.inc("sparsevlm_engine_vision_cache_hits", "m")
    other = [["sparsevlm_engine_vision_cache_misses", "m", 3.0]]  # another worker's file
    (tmp_path / f"{os.getpid() + 1}.json").write_text(json.dumps(other))
    registry = CollectorRegistry()
    registry.register(SharedCountersCollector(tmp_path))
    text = generate_latest(registry).decode()
    assert 'sparsevlm_engine_vision_cache_misses_total{model="m"} 5.0' in text
    assert 'sparsevlm_engine_vision_cache_hits_total{model="m"} 1.0' in text
    with pytest.raises(AssertionError, match="unknown engine counter"):
        mine.inc("sparsevlm_engine_typo", "m")
