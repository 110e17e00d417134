"""Counters kept in the engine's worker processes, shown on the engine's ``/metrics``.

vLLM's ``/metrics`` is the API-server process's Prometheus registry, but the vision tower runs in
a worker process. Each worker keeps its counts in memory and writes them, on every change, to a
small JSON file of its own in a directory all engine processes share (created by the first
process that loads the plugin, inherited by the processes it starts). The API server registers a
custom collector (client_python's documented extension point) that sums those files when scraped.
Events are rare (one per image a worker encodes), so a file write per event costs nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import REGISTRY, CounterMetricFamily
from prometheus_client.registry import Collector

DIR_ENV = "SPARSEVLM_ENGINE_METRICS_DIR"

# name (without _total) -> help; every counter has the one label "model"
COUNTERS = {
    "sparsevlm_engine_vision_cache_hits": "Pruned images whose vision-tower output came from the "
    "plugin's vision cache (the tower did not run).",
    "sparsevlm_engine_vision_cache_misses": "Pruned images the vision tower encoded (not in the "
    "plugin's vision cache).",
}


def shared_dir() -> Path:
    """The directory shared by this engine's processes (created on first use, with cleanup)."""
    path = os.environ.get(DIR_ENV)
    if path:
        return Path(path)
    created = tempfile.mkdtemp(prefix="sparsevlm-engine-metrics-")
    os.environ[DIR_ENV] = created  # inherited by the engine-core and worker processes
    atexit.register(shutil.rmtree, created, ignore_errors=True)
    return Path(created)


class ProcessCounters:
    """This process's counters; every ``inc`` rewrites its file atomically."""

    def __init__(self, directory: Path | None = None) -> None:
        self._dir = directory or shared_dir()
        self._values: dict[tuple[str, str], float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, name: str, model: str, amount: float = 1.0) -> None:
        assert name in COUNTERS, f"unknown engine counter {name}"
        if amount <= 0:
            return
        with self._lock:
            self._values[(name, model)] += amount
            rows = [[n, m, v] for (n, m), v in self._values.items()]
            path = self._dir / f"{os.getpid()}.json"
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(rows))
                os.replace(tmp, path)
            except OSError:  # the API server has exited and removed the directory
                pass


class SharedCountersCollector(Collector):
    """Sums every engine process's counter file at scrape time."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals: dict[tuple[str, str], float] = defaultdict(float)
        for path in self._dir.glob("*.json"):
            try:
                rows = json.loads(path.read_text())
            except (OSError, ValueError):  # a process is rewriting it (os.replace is atomic)
                continue
            for name, model, value in rows:
                totals[(name, model)] += float(value)
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=["model"])
            for (n, model), value in sorted(totals.items()):
                if n == name:
                    family.add_metric([model], value)
            yield family


_collector: SharedCountersCollector | None = None


def export() -> None:
    """Expose the engine processes' counters on this process's default registry (idempotent)."""
    global _collector
    if _collector is None:
        _collector = SharedCountersCollector(shared_dir())
        REGISTRY.register(_collector)
