"""Fixtures for the plugin's end-to-end tests: chat helpers over a live vLLM server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.conftest import image_data_url, serve_model
from tests.vllm_server import VllmServer


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]

    @property
    def tokens(self) -> list[str]:
        return [t["token"] for t in self.body["choices"][0]["logprobs"]["content"]]

    @property
    def logprobs(self) -> list[float]:
        return [t["logprob"] for t in self.body["choices"][0]["logprobs"]["content"]]

    @property
    def prompt_tokens(self) -> int:
        return int(self.body["usage"]["prompt_tokens"])

    @property
    def image_tokens(self) -> int:
        return int(self.body["usage"]["prompt_tokens_details"]["multimodal_tokens"]["image"])

    @property
    def video_tokens(self) -> int:
        return int(self.body["usage"]["prompt_tokens_details"]["multimodal_tokens"]["video"])

    @property
    def error(self) -> str:
        return str(self.body["error"]["message"])


LOGPROB_TOL = 1e-4  # one engine's answer vs another's (fp32 on CPU; warm vs cold caches)


def assert_same_answer(a: Answer, b: Answer) -> None:
    assert a.status == b.status == 200, (a.body, b.body)
    assert a.tokens == b.tokens
    assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOL)


def chat_body(
    model: str,
    images: list[Image.Image],
    question: str,
    knob: dict | None = None,
    max_tokens=6,
    videos: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One user turn: the images, then the videos (data URLs), then the question."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images
    ]
    content += [{"type": "video_url", "video_url": {"url": url}} for url in videos]
    content.append({"type": "text", "text": question})
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    if knob is not None:
        body["mm_processor_kwargs"] = {"sparsevlm": knob}
    return body


class Chat:
    """Synchronous and concurrent chat requests against one server."""

    def __init__(self, server: VllmServer) -> None:
        self.server = server
        self.model = Path(server.model).name

    def __call__(self, images, question, knob=None, max_tokens=6, videos=()) -> Answer:
        return self.post(chat_body(self.model, images, question, knob, max_tokens, videos))

    def post(self, body: dict[str, Any]) -> Answer:
        r = httpx.post(f"{self.server.url}/v1/chat/completions", json=body, timeout=300)
        return Answer(r.status_code, r.json())

    def many(self, requests: list[tuple]) -> list[Answer]:
        async def run() -> list[Answer]:
            async with httpx.AsyncClient(timeout=300) as client:

                async def one(args: tuple) -> Answer:
                    body = chat_body(self.model, *args)
                    r = await client.post(f"{self.server.url}/v1/chat/completions", json=body)
                    return Answer(r.status_code, r.json())

                return await asyncio.gather(*(one(a) for a in requests))

        return asyncio.run(run())

    def assert_batch_equals_solo(self, requests: list[tuple]) -> None:
        """The requests answered one at a time and all at once (one batch) answer alike."""
        solo = [self(*r) for r in requests]
        for s, b in zip(solo, self.many(requests), strict=True):
            assert_same_answer(s, b)
            assert s.prompt_tokens == b.prompt_tokens

    def metric(self, name: str, label: str = "") -> float:
        """Sum of a metric's samples (those whose labels contain ``label``, e.g.
        ``modality="video"``)."""
        text = httpx.get(f"{self.server.url}/metrics", timeout=30).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if label in line.rsplit(" ", 1)[0]:
                    total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="session")
def chat(llava_server: VllmServer) -> Chat:
    return Chat(llava_server)


@pytest.fixture(scope="session")
def stock_chat(llava_stock_server: VllmServer) -> Chat:
    return Chat(llava_stock_server)


def shapes_image(seed: int) -> Image.Image:
    """A deterministic picture with a few coloured shapes (content for the random model)."""
    import random

    rng = random.Random(seed)
    img = Image.new("RGB", (336, 336), (240, 240, 235))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, s = rng.randint(0, 270), rng.randint(0, 270), rng.randint(30, 66)
        colour = rng.choice([(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)])
        draw.rectangle([x, y, x + s, y + s], fill=colour)
    return img


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [shapes_image(i) for i in range(3)]


# The guided engine also carries a server-side default knob (tested in test_llava_e2e).
GUIDED_DEFAULT_KNOB = '{"visual_tokens": 100, "method": "uniform"}'


@pytest.fixture(scope="session")
def guided_server(fixture_models: dict[str, Path], tmp_path_factory) -> Iterator[VllmServer]:
    trace = tmp_path_factory.mktemp("trace") / "selection.jsonl"
    env = {"SPARSEVLM_TRACE": str(trace), "SPARSEVLM_DEFAULT": GUIDED_DEFAULT_KNOB}
    for server in serve_model(fixture_models["llava-1.5-guided"], env=env):
        server.trace_path = trace  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def fresh_chat(llava_fresh_server: VllmServer) -> Chat:
    """A second plugin engine that has not seen this module's images: the reference for
    cache-isolation tests."""
    return Chat(llava_fresh_server)
