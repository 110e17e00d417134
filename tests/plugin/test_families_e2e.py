"""SparseVLM inside real vLLM engines on the LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL fixtures.

Same guarantees as the LLaVA-1.5 tests, per family: off == stock vLLM; prompt lengths equal the
family's independent token formula minus the savings for several image sizes; no cross-question
cache leaks; prefix caching still hits; mixed batches equal solo runs; bad knobs are 400s; the
engine counters are exact. The Qwen families' M-RoPE positions and Qwen3-VL's DeepStack are checked
against HF transformers in test_qwen_positions.py, its probe in test_qwen3_probe.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import BLOCK_SIZE, serve_model
from tests.plugin.conftest import LOGPROB_TOL, Chat, assert_same_answer, shapes_image
from tests.smoke.test_families import FORMULAS
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

FAMILIES = ["llava-next", "qwen2.5-vl", "qwen3-vl"]
SERVER_FIXTURE = {
    "llava-next": "llava_next_server",
    "qwen2.5-vl": "qwen_server",
    "qwen3-vl": "qwen3_server",
}
Q1 = "What color is the circle?"
Q2 = "How many triangles are there?"
SIZES = [(336, 336), (800, 600), (300, 900), (1000, 260)]  # square, 4:3, tall, wide


def sized(seed: int, size: tuple[int, int]) -> Image.Image:
    return shapes_image(seed).resize(size)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    """Module-scoped, so pytest runs one family's tests together (one stock engine at a time)."""
    return request.param


@pytest.fixture
def chat(family: str, request) -> Chat:
    return Chat(request.getfixturevalue(SERVER_FIXTURE[family]))


@pytest.fixture(scope="module")
def stock_server(family: str, fixture_models: dict[str, Path]) -> Iterator[VllmServer]:
    """Stock vLLM (plugins off) for the family under test only (memory: engines add up)."""
    yield from serve_model(
        fixture_models[family], plugins=False, max_model_len=8192, block_size=BLOCK_SIZE
    )


@pytest.fixture
def stock_chat(stock_server: VllmServer) -> Chat:
    return Chat(stock_server)


def traced(chat: Chat) -> list[dict]:
    path = chat.server.trace_path  # type: ignore[attr-defined]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# 1. Off == stock --------------------------------------------------------------------------------
@pytest.mark.parametrize("knob", [None, {"method": "off"}, {"visual_tokens": 100_000}])
def test_unpruned_equals_stock_vllm(chat: Chat, stock_chat: Chat, knob):
    imgs = [sized(0, (336, 336)), sized(1, (800, 600))]
    ours, stock = chat(imgs, Q1, knob), stock_chat(imgs, Q1)
    assert ours.status == 200, ours.body
    assert ours.prompt_tokens == stock.prompt_tokens
    assert ours.tokens == stock.tokens
    if knob is None or knob.get("method") == "off":
        assert ours.logprobs == stock.logprobs  # bit-identical: nothing was touched
    else:  # a no-op budget still keys its own cache entries: a cold prefill vs a warm one
        assert ours.logprobs == pytest.approx(stock.logprobs, abs=LOGPROB_TOL)


# 2. Budgets shrink the prompt by exactly the independent formula minus K ------------------------
@pytest.mark.parametrize(
    ("knob", "kept"),
    [
        ({"visual_tokens": 64}, lambda n: min(64, n)),
        ({"visual_tokens": 64, "version": "v2"}, lambda n: min(64, n)),
        ({"visual_tokens": 100, "method": "fastv"}, lambda n: min(100, n)),
        ({"visual_tokens": 32, "method": "uniform"}, lambda n: min(32, n)),
        ({"keep_ratio": 0.25}, lambda n: max(1, int(0.25 * n + 0.5))),
        ({"keep_ratio": 0.1, "method": "random"}, lambda n: max(1, int(0.1 * n + 0.5))),
    ],
)
def test_prompt_length_is_formula_minus_savings(family: str, chat: Chat, knob, kept):
    formula = FORMULAS[family]
    for a, b in [(SIZES[0], SIZES[1]), (SIZES[2], SIZES[3])]:
        imgs = [sized(2, a), sized(3, b)]
        full, pruned = chat(imgs, Q1), chat(imgs, Q1, knob)
        assert pruned.status == 200, pruned.body
        n = [formula(*a), formula(*b)]
        assert full.image_tokens == sum(n)
        assert pruned.image_tokens == sum(kept(x) for x in n)
        assert full.prompt_tokens - pruned.prompt_tokens == sum(x - kept(x) for x in n)


# 3. No cross-question cache leaks ---------------------------------------------------------------
def test_each_question_gets_its_own_selection(chat: Chat):
    img = [sized(4, (800, 600))]
    knob = {"visual_tokens": 64}
    before = len(traced(chat))
    first = [chat(img, Q1, knob), chat(img, Q2, knob)]
    records = traced(chat)[before:]
    assert len(records) == 2, "each question must run its own selection (no encoder-cache reuse)"
    assert records[0]["kept"] != records[1]["kept"]  # the questions really select differently
    again = [chat(img, Q1, knob), chat(img, Q2, knob)]
    both = chat.many([(img, Q1, knob), (img, Q2, knob)])
    for got in (again, both):
        assert_same_answer(got[0], first[0])
        assert_same_answer(got[1], first[1])


def test_prefix_cache_still_works_for_repeats(chat: Chat):
    img = [sized(5, (1000, 260))]
    knob = {"visual_tokens": 300}  # > one KV block (128 tokens on CPU) so a hit is visible
    first = chat(img, "Is there a blue square?", knob)
    again = chat(img, "Is there a blue square?", knob)
    assert_same_answer(first, again)
    assert again.body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# 5. Mixed batches ------------------------------------------------------------------------------
def test_mixed_batch_equals_solo(chat: Chat):
    a, b, c = sized(6, (336, 336)), sized(7, (800, 600)), sized(8, (300, 900))
    requests = [
        ([a], Q1, None),
        ([a, b], Q2, {"visual_tokens": 64}),  # two pruned images of different sizes
        ([b], Q1, {"visual_tokens": 32, "method": "random"}),
        ([c, a], Q2, {"keep_ratio": 0.1, "version": "v2"}),
        ([b, c], Q1, {"visual_tokens": 100, "method": "fastv"}),
        ([c], "Describe the image in detail.", {"method": "off"}),
    ]
    chat.assert_batch_equals_solo(requests)


# 6. Bad knobs are 400s that name the field -----------------------------------------------------
@pytest.mark.parametrize(
    ("knob", "field", "words"),
    [
        ({"visual_tokens": 0}, "sparsevlm.visual_tokens", "greater than or equal to 1"),
        ({"visual_tokens": 8, "keep_ratio": 0.5}, "sparsevlm", "not both"),
        ({"visual_tokens": 8, "score_layer": 4}, "sparsevlm.score_layer", "4 decoder layers"),
        ({"visual_tokens": 8, "scope": "chat"}, "sparsevlm.scope", "'turn' or 'prompt'"),
    ],
)
def test_bad_knob_is_400_naming_the_field(chat: Chat, knob, field, words):
    img = [sized(0, (336, 336))]
    bad = chat(img, Q1, knob)
    assert bad.status == 400, bad.body
    assert field in bad.error and words in bad.error, bad.error
    assert chat(img, Q1, {"visual_tokens": 16}).status == 200


# 7. Counters -----------------------------------------------------------------------------------
def test_engine_counters_count_real_requests_exactly(family: str, chat: Chat):
    formula = FORMULAS[family]
    original = "sparsevlm_engine_visual_tokens_original_total"
    kept = "sparsevlm_engine_visual_tokens_kept_total"
    before = chat.metric(original), chat.metric(kept)
    a, b = (800, 600), (300, 900)
    chat([sized(9, a)], Q1)
    chat([sized(9, a), sized(10, b)], Q2, {"visual_tokens": 50})
    chat([sized(10, b)], Q2, {"visual_tokens": 0})  # rejected: not counted
    after = chat.metric(original), chat.metric(kept)
    assert after[0] - before[0] == 2 * formula(*a) + formula(*b)
    assert after[1] - before[1] == formula(*a) + 100
