"""Session-wide fixtures: tiny models built once per machine, one real vLLM server per model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparse_plugin.fixtures import cached_fixtures
from tests.vllm_server import VllmServer

pytest_plugins = ["tests.gateway_fixtures"]


@pytest.fixture(scope="session")
def fixture_models() -> dict[str, Path]:
    return cached_fixtures()


# KV cache of a test engine: the tiny models need a few MiB per full-length sequence; 1 GiB each
# (the CPU default here) OOM-killed engines once ~9 were alive together on the 24 GiB machine.
TEST_KV_BYTES = 256 * 2**20


def serve_model(model: Path, **kw: object) -> Iterator[VllmServer]:
    kw.setdefault("kv_cache_bytes", TEST_KV_BYTES)
    server = VllmServer(model, **kw).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


# The session engines use 32-token KV blocks (the smallest the CPU attention takes; GPUs default
# to 16), so the prefix cache shows reuse on short pruned prompts; CPU's default 128 would not.
BLOCK_SIZE = 32


def serve_traced(model: Path, trace: Path, **kw: object) -> Iterator[VllmServer]:
    """A plugin engine that appends every selection to ``trace`` (SPARSEVLM_TRACE)."""
    env = {"SPARSEVLM_TRACE": str(trace), **kw.pop("env", {})}  # type: ignore[dict-item]
    for server in serve_model(model, env=env, **kw):
        server.trace_path = trace  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="session")
def llava_server(fixture_models: dict[str, Path], tmp_path_factory) -> Iterator[VllmServer]:
    """vLLM + the SparseVLM plugin on the tiny LLaVA-1.5 fixture (prefix caching on, default)."""
    trace = tmp_path_factory.mktemp("trace-llava") / "selection.jsonl"
    yield from serve_traced(fixture_models["llava-1.5"], trace, block_size=BLOCK_SIZE)


def serve_fresh(model: Path, trace: Path, **kw: object) -> Iterator[VllmServer]:
    """A plugin engine for computing answers from scratch: no vision cache, and vLLM's cache-reset
    endpoints on (dev mode), so a caller can empty every cache before a request."""
    env = {"VLLM_SERVER_DEV_MODE": "1", "SPARSEVLM_VISION_CACHE_MB": "0"}
    yield from serve_traced(model, trace, env=env, block_size=BLOCK_SIZE, **kw)


@pytest.fixture(scope="session")
def llava_fresh_server(fixture_models: dict[str, Path], tmp_path_factory) -> Iterator[VllmServer]:
    """A second LLaVA-1.5 plugin engine: the from-scratch reference of cache-isolation tests."""
    trace = tmp_path_factory.mktemp("trace-llava-fresh") / "selection.jsonl"
    yield from serve_fresh(fixture_models["llava-1.5"], trace, name="llava-1.5-fresh")


@pytest.fixture(scope="session")
def llava_stock_server(fixture_models: dict[str, Path]) -> Iterator[VllmServer]:
    """Stock vLLM (plugins disabled) on the same fixture: the reference for 'off == stock'."""
    yield from serve_model(fixture_models["llava-1.5"], plugins=False, block_size=BLOCK_SIZE)


@pytest.fixture(scope="session")
def llava_next_server(fixture_models: dict[str, Path], tmp_path_factory) -> Iterator[VllmServer]:
    trace = tmp_path_factory.mktemp("trace-next") / "selection.jsonl"
    yield from serve_traced(
        fixture_models["llava-next"], trace, max_model_len=8192, block_size=BLOCK_SIZE
    )


VIDEOS_PER_PROMPT = 2  # the Qwen2.5-VL engines take videos (two per prompt at most)


@pytest.fixture(scope="session")
def qwen_server(fixture_models: dict[str, Path], tmp_path_factory) -> Iterator[VllmServer]:
    trace = tmp_path_factory.mktemp("trace-qwen") / "selection.jsonl"
    yield from serve_traced(
        fixture_models["qwen2.5-vl"],
        trace,
        max_model_len=8192,
        block_size=BLOCK_SIZE,
        videos_per_prompt=VIDEOS_PER_PROMPT,
    )


@pytest.fixture(scope="session")
def qwen3_server(fixture_models: dict[str, Path], tmp_path_factory) -> Iterator[VllmServer]:
    trace = tmp_path_factory.mktemp("trace-qwen3") / "selection.jsonl"
    yield from serve_traced(
        fixture_models["qwen3-vl"], trace, max_model_len=8192, block_size=BLOCK_SIZE
    )


def image_data_url(img: object, fmt: str = "PNG") -> str:
    """A PIL image as a ``data:`` URL for OpenAI image_url parts."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)  # type: ignore[attr-defined]
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def shapes_video(
    seed: int, frames: int = 8, size: tuple[int, int] = (224, 224), moving: bool = True
) -> list[object]:
    """A deterministic clip: a few coloured squares on a plain ground, one moving across it
    (``moving``), the others still; (width, height) ``size``. A list of PIL frames."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = size
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]
    still = [
        (rng.randint(0, w - 40), rng.randint(0, h - 40), rng.randint(16, 40), rng.choice(colours))
        for _ in range(3)
    ]
    out = []
    for f in range(frames):
        img = Image.new("RGB", size, (240, 240, 235))
        draw = ImageDraw.Draw(img)
        for x, y, s, c in still:
            draw.rectangle([x, y, x + s, y + s], fill=c)
        if moving:
            x = int((w - 30) * f / max(1, frames - 1))
            draw.ellipse([x, h // 2 - 15, x + 30, h // 2 + 15], fill=(220, 30, 30))
        out.append(img)
    return out


def video_bytes(frames: list[object], fps: float = 4.0, fourcc: str = "mp4v") -> bytes:
    """PIL frames encoded as a video file (OpenCV's writer; mp4v -> .mp4, VP80 -> .webm)."""
    import tempfile

    import cv2
    import numpy as np

    suffix = {"mp4v": ".mp4", "VP80": ".webm", "MJPG": ".avi"}[fourcc]
    w, h = frames[0].size  # type: ignore[attr-defined]
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        writer = cv2.VideoWriter(f.name, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
        for frame in frames:
            writer.write(cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR))
        writer.release()
        return Path(f.name).read_bytes()


def video_data_url(frames: list[object], fps: float = 4.0, fourcc: str = "mp4v") -> str:
    mime = {"mp4v": "video/mp4", "VP80": "video/webm", "MJPG": "video/x-msvideo"}[fourcc]
    return f"data:{mime};base64," + base64.b64encode(video_bytes(frames, fps, fourcc)).decode()
