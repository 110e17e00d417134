"""Session fixtures: a live gateway (uvicorn on loopback) in front of the test vLLM server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.config import Settings
from server.main import create_app
from tests.vllm_server import VllmServer, free_port

API_KEY = "test-key-123"


@dataclass
class LiveGateway:
    url: str
    api_key: str
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_gateway(settings: Settings) -> LiveGateway:
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "gateway did not start"
    key = settings.accepted_keys[0] if settings.accepted_keys else ""
    return LiveGateway(url, key, settings, server, thread)


def gateway_settings(upstream: str, model_dir: Path | None, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "upstream_url": upstream,
        "model_dir": model_dir,
        "api_keys": [API_KEY],
        "max_images": 3,
        "max_body_bytes": 4 * 1024 * 1024,
        "max_image_pixels": 1024 * 1024,
        "max_concurrency": 48,
    }
    return Settings(**(base | overrides))


@pytest.fixture(scope="session")
def gateway(llava_server: VllmServer) -> Iterator[LiveGateway]:
    """The product's front door on the session's LLaVA-1.5 engine (plugin loaded)."""
    live = start_gateway(gateway_settings(llava_server.url, Path(llava_server.model)))
    httpx.get(f"{live.url}/health", timeout=10).raise_for_status()
    try:
        yield live
    finally:
        live.stop()
