"""Multi-turn chat with pruning, in real vLLM engines of all three families (issue 16).

Turn scope: every later turn reproduces an image's selection, so the prefix cache serves the
earlier turns, the vision tower runs once per image for the whole conversation, and every answer
equals what an engine that computes everything from scratch gives. Prompt scope: each question
re-selects, the vision tower still runs once per image. Conversations never share what they
should not.

The reference ("fresh") engine of each family resets its prefix, processor and encoder caches
before every request and has no vision cache, so each of its answers is computed from nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import (
    BLOCK_SIZE,
    VIDEOS_PER_PROMPT,
    image_data_url,
    serve_fresh,
    shapes_video,
    video_data_url,
)
from tests.plugin.conftest import Answer, Chat, assert_same_answer, shapes_image
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

FAMILIES = ["llava-1.5", "llava-next", "qwen2.5-vl"]
SERVER_FIXTURE = {
    "llava-1.5": "llava_server",
    "llava-next": "llava_next_server",
    "qwen2.5-vl": "qwen_server",
}
# Top-K (coverage 0): on the random-weight fixtures, coverage's spread can make two questions
# select alike, and these tests need them to differ to show that selections are not shared.
KNOB = {"visual_tokens": 64, "scope": "turn", "coverage": 0}
QUESTIONS = [
    "What color is the circle?",
    "How many triangles are there?",
    "Is there a blue square?",
    "What shape is the red object?",
    "Describe the image in detail.",
]
MISSES = "sparsevlm_engine_vision_cache_misses_total"
HITS = "sparsevlm_engine_vision_cache_hits_total"
_seeds = iter(range(7000, 8000))


def new_image() -> Image.Image:
    """A picture no engine of this session has seen (so its first encoding is a real miss)."""
    return shapes_image(next(_seeds))


def records(server: VllmServer) -> list[dict]:
    path: Path = server.trace_path  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Conversation:
    """A chat client: resends the whole conversation each turn and appends the reply."""

    model: str
    knob: dict[str, Any] | None = None
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def next_body(
        self, text: str, images: list[Image.Image] = (), videos: list[str] = ()
    ) -> dict[str, Any]:
        parts = [{"type": "image_url", "image_url": {"url": image_data_url(i)}} for i in images]
        parts += [{"type": "video_url", "video_url": {"url": url}} for url in videos]
        parts.append({"type": "text", "text": text})
        self.messages.append({"role": "user", "content": parts})
        body = {
            "model": self.model,
            "messages": list(self.messages),
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        }
        if self.knob is not None:
            body["mm_processor_kwargs"] = {"sparsevlm": self.knob}
        return body

    def record(self, answer: Answer) -> Answer:
        assert answer.status == 200, answer.body
        reply = answer.body["choices"][0]["message"]["content"]
        self.messages.append({"role": "assistant", "content": reply})
        return answer

    def ask(
        self, chat: Chat, text: str, images: list[Image.Image] = (), videos: list[str] = ()
    ) -> tuple[dict, Answer]:
        body = self.next_body(text, images, videos)
        return body, self.record(chat.post(body))


class FreshEngine(Chat):
    """Answers every request from scratch: all vLLM caches reset first, no vision cache."""

    def post(self, body: dict[str, Any]) -> Answer:
        for cache in ("prefix", "mm", "encoder"):
            r = httpx.post(f"{self.server.url}/reset_{cache}_cache", timeout=30)
            assert r.status_code == 200, r.text
        return super().post(body)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    """Module-scoped, so pytest runs one family's tests together (one reference engine at a
    time: engines take ~3-4 GB each)."""
    return request.param


@pytest.fixture
def chat(family: str, request) -> Chat:
    return Chat(request.getfixturevalue(SERVER_FIXTURE[family]))


@pytest.fixture(scope="module")
def fresh(family: str, fixture_models, tmp_path_factory, request) -> Iterator[FreshEngine]:
    if family == "llava-1.5":  # the session's from-scratch LLaVA engine (test_llava_e2e uses it)
        yield FreshEngine(request.getfixturevalue("llava_fresh_server"))
        return
    trace = tmp_path_factory.mktemp(f"fresh-{family}") / "selection.jsonl"
    name = f"{family}-fresh"
    videos = VIDEOS_PER_PROMPT if family == "qwen2.5-vl" else 0
    for server in serve_fresh(
        fixture_models[family], trace, max_model_len=8192, name=name, videos_per_prompt=videos
    ):
        yield FreshEngine(server)


def assert_prefix_cache_served_earlier_turns(answers: list[Answer]) -> None:
    """Turn t ≥ 2 reads at least the previous request's prompt, in whole KV blocks, from cache."""
    for prev, cur in zip(answers, answers[1:], strict=False):
        cached = cur.body["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= prev.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE, (
            [a.prompt_tokens for a in answers],
            [a.body["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers],
        )


# Each script: per turn, the images it adds (by index into the conversation's new images).
SCRIPTS = {
    "image in turn 1": ([[0], [], [], [], []], None),
    "image first in turn 3, system prompt": ([[], [], [0], [], []], "You are a careful assistant."),
    "images in turns 1 and 3": ([[0], [], [1], [], []], None),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_turn_scope_conversation_reuses_every_cache(chat: Chat, fresh: FreshEngine, script):
    plan, system = SCRIPTS[script]
    images = [new_image() for _ in range(1 + max(i for turn in plan for i in turn))]
    conv = Conversation(chat.model, KNOB, system)
    misses, hits, traced = chat.metric(MISSES), chat.metric(HITS), len(records(chat.server))
    fresh_traced = len(records(fresh.server))
    bodies, answers = [], []
    for turn, text in zip(plan, QUESTIONS, strict=True):
        body, answer = conv.ask(chat, text, [images[i] for i in turn])
        bodies.append(body)
        answers.append(answer)

    assert_prefix_cache_served_earlier_turns(answers)
    # The vision tower ran once per image for the whole conversation, and so did the selection.
    assert chat.metric(MISSES) - misses == len(images)
    assert chat.metric(HITS) - hits == 0  # follow-ups never even reached the encoder step
    assert len(records(chat.server)) - traced == len(images)
    # Every turn's answer is what an engine computing everything from scratch says ...
    for body, answer in zip(bodies, answers, strict=True):
        assert_same_answer(answer, fresh.post(body))
    # ... and that engine, selecting anew each turn, picks the same tokens every turn.
    kept_by_image: dict[str, set[str]] = {}
    for r in records(fresh.server)[fresh_traced:]:
        kept_by_image.setdefault(r["image"], set()).add(json.dumps(r["kept"]))
    assert len(kept_by_image) == len(images)
    assert all(len(kept) == 1 for kept in kept_by_image.values()), kept_by_image


def test_conversations_share_nothing_they_should_not(chat: Chat, fresh: FreshEngine):
    image = new_image()
    before = len(records(chat.server))
    # Same image, different first questions: each conversation gets its own selection.
    a, b = Conversation(chat.model, KNOB), Conversation(chat.model, KNOB)
    _, a1 = a.ask(chat, QUESTIONS[0], [image])
    body_b1, b1 = b.ask(chat, QUESTIONS[1], [image])
    first = records(chat.server)[before:]
    assert len(first) == 2 and first[0]["image"] == first[1]["image"]
    assert first[0]["kept"] != first[1]["kept"]
    assert_same_answer(b1, fresh.post(body_b1))  # B's answer is not A's leftover
    # An edited earlier turn re-selects; the conversation goes on from the edit.
    edited = Conversation(chat.model, KNOB)
    body_e1, e1 = edited.ask(chat, "Where is the red square?", [image])
    assert len(records(chat.server)) - before == 3
    bodies, answers = [body_e1], [e1]
    for text in QUESTIONS[2:4]:
        body, answer = edited.ask(chat, text, [])
        bodies.append(body)
        answers.append(answer)
    assert len(records(chat.server)) - before == 3  # its follow-ups reuse its own selection
    for body, answer in zip(bodies, answers, strict=True):
        assert_same_answer(answer, fresh.post(body))
    # Two conversations about one new image, turn by turn at the same time.
    shared = new_image()
    convs = [Conversation(chat.model, KNOB) for _ in range(2)]
    asked: list[tuple[dict, Answer]] = []
    for turn in range(3):
        bodies = [
            c.next_body(QUESTIONS[(turn + k) % 5], [shared] if turn == 0 else [])
            for k, c in enumerate(convs)
        ]
        got = chat_many(chat, bodies)
        asked += [(body, c.record(ans)) for body, c, ans in zip(bodies, convs, got, strict=True)]
    for body, answer in asked:
        assert_same_answer(answer, fresh.post(body))


def chat_many(chat: Chat, bodies: list[dict]) -> list[Answer]:
    async def run() -> list[Answer]:
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(body: dict) -> Answer:
                r = await client.post(f"{chat.server.url}/v1/chat/completions", json=body)
                return Answer(r.status_code, r.json())

            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(run())


def test_prompt_scope_reselects_each_turn_and_encodes_once(chat: Chat, fresh: FreshEngine):
    image = new_image()
    conv = Conversation(chat.model, {"visual_tokens": 64, "scope": "prompt"})
    misses, hits, before = chat.metric(MISSES), chat.metric(HITS), len(records(chat.server))
    asked = [conv.ask(chat, text, [image] if i == 0 else []) for i, text in enumerate(QUESTIONS)]
    selections = records(chat.server)[before:]
    assert len(selections) == len(QUESTIONS)  # every question selected anew ...
    suffixes = [r["context"][1] for r in selections]
    assert suffixes == sorted(set(suffixes))  # ... rated by all the text after the image
    assert len({json.dumps(r["kept"]) for r in selections}) > 1  # and it selected differently
    assert chat.metric(MISSES) - misses == 1  # the vision tower still ran once
    assert chat.metric(HITS) - hits == len(QUESTIONS) - 1
    assert [r["vision"] for r in selections] == ["miss"] + ["hit"] * (len(QUESTIONS) - 1)
    for body, answer in asked:  # cached tower outputs answer exactly as recomputed ones
        assert_same_answer(answer, fresh.post(body))


def test_prompt_scope_encodes_only_the_new_image_of_a_batch(chat: Chat, fresh: FreshEngine):
    """Turn 2 brings a second image: the known one comes from the vision cache, the tower runs on
    the new one alone (the per-family split of a batch of tower inputs)."""
    known, new = new_image(), new_image()
    conv = Conversation(chat.model, {"visual_tokens": 64, "scope": "prompt"})
    misses, hits = chat.metric(MISSES), chat.metric(HITS)
    asked = [conv.ask(chat, QUESTIONS[0], [known]), conv.ask(chat, QUESTIONS[1], [new])]
    assert chat.metric(MISSES) - misses == 2
    assert chat.metric(HITS) - hits == 1
    for body, answer in asked:
        assert_same_answer(answer, fresh.post(body))


# -- videos (Qwen2.5-VL): the same conversation-stable behaviour -----------------------------------
VIDEO_KNOB = {"visual_tokens": 48, "video_tokens": 64, "scope": "turn", "coverage": 0}


def new_video() -> str:
    """A clip no engine of this session has seen: 8 frames at 4 fps, 288 tokens."""
    return video_data_url(shapes_video(next(_seeds), frames=8), fps=4.0)


@pytest.mark.parametrize("script", ["video in turn 1", "image in turn 1, video in turn 3"])
def test_turn_scope_video_conversation_reuses_every_cache(
    family: str, chat: Chat, fresh: FreshEngine, script
):
    if family != "qwen2.5-vl":
        pytest.skip("videos are pruned for Qwen2.5-VL")
    video = new_video()
    plan = (
        [([], [video])] + [([], [])] * 4
        if script == "video in turn 1"
        else [([new_image()], []), ([], []), ([], [video]), ([], []), ([], [])]
    )
    conv = Conversation(chat.model, VIDEO_KNOB)
    misses, traced = chat.metric(MISSES), len(records(chat.server))
    fresh_traced = len(records(fresh.server))
    asked = [conv.ask(chat, text, *turn) for turn, text in zip(plan, QUESTIONS, strict=True)]
    items = sum(len(images) + len(videos) for images, videos in plan)

    assert_prefix_cache_served_earlier_turns([answer for _, answer in asked])
    assert chat.metric(MISSES) - misses == items  # the tower ran once per item ...
    assert len(records(chat.server)) - traced == items  # ... and so did the selection
    assert {r["modality"] for r in records(chat.server)[traced:]} >= {"video"}
    for body, answer in asked:
        assert_same_answer(answer, fresh.post(body))
    kept: dict[str, set[str]] = {}  # selecting anew each turn, the reference agrees every turn
    for r in records(fresh.server)[fresh_traced:]:
        kept.setdefault(r["image"], set()).add(json.dumps(r["kept"]))
    assert len(kept) == items and all(len(k) == 1 for k in kept.values()), kept


def test_prompt_scope_video_reselects_each_turn_and_encodes_once(
    family: str, chat: Chat, fresh: FreshEngine
):
    if family != "qwen2.5-vl":
        pytest.skip("videos are pruned for Qwen2.5-VL")
    video = new_video()
    conv = Conversation(chat.model, {"video_tokens": 64, "scope": "prompt"})
    misses, hits, before = chat.metric(MISSES), chat.metric(HITS), len(records(chat.server))
    asked = [conv.ask(chat, q, [], [video] if i == 0 else []) for i, q in enumerate(QUESTIONS)]
    selections = records(chat.server)[before:]
    assert [r["modality"] for r in selections] == ["video"] * len(QUESTIONS)
    assert len({json.dumps(r["kept"]) for r in selections}) > 1  # each question re-selected
    assert chat.metric(MISSES) - misses == 1  # one tower run for the whole conversation
    assert chat.metric(HITS) - hits == len(QUESTIONS) - 1
    for body, answer in asked:
        assert_same_answer(answer, fresh.post(body))
