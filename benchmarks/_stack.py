"""The serving stack for benchmarks: a vLLM engine (plugin loaded) on loopback + the gateway."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gateway_fixtures import gateway_settings, start_gateway  # noqa: E402
from tests.vllm_server import VllmServer  # noqa: E402


def start_stack(
    model_dir: Path, name: str, **engine: object
) -> tuple[str, str, VllmServer, Callable[[], None]]:
    """Start engine + gateway; returns (gateway url, API key, engine, stop)."""
    server = VllmServer(model_dir, name=name, images_per_prompt=1, **engine)  # type: ignore[arg-type]
    server.start(timeout=900)
    gw = start_gateway(gateway_settings(server.url, model_dir, max_concurrency=64))

    def stop() -> None:
        gw.stop()
        server.stop()

    return gw.url, gw.api_key, server, stop
