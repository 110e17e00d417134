"""SparseVLM inside a real vLLM engine on the tiny LLaVA-1.5 fixture (issue 4, tests 1-7)."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

from sparse_plugin.fixtures.guided import BACKGROUND, RED
from tests.plugin.conftest import LOGPROB_TOL, Chat, assert_same_answer

pytestmark = pytest.mark.engine

Q1 = "What color is the circle?"
Q2 = "How many triangles are there?"


# 1. Off == stock --------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("question", [Q1, Q2, "Describe the image in detail."])
def test_no_knob_equals_stock_vllm(chat: Chat, stock_chat: Chat, images, n_images, question):
    imgs = images[:n_images]
    ours, stock = chat(imgs, question), stock_chat(imgs, question)
    assert ours.prompt_tokens == stock.prompt_tokens
    assert ours.image_tokens == stock.image_tokens == 576 * n_images
    assert ours.tokens == stock.tokens
    assert ours.logprobs == stock.logprobs  # bit-identical: the plugin did not touch anything


def test_method_off_equals_stock(chat: Chat, stock_chat: Chat, images):
    off = chat(images[:1], Q1, {"method": "off"})
    assert_same_answer(off, stock_chat(images[:1], Q1))


# 2. Budgets shrink the prompt exactly -----------------------------------------------------------
@pytest.mark.parametrize(
    ("knob", "kept"),
    [
        ({"visual_tokens": 64}, 64),
        ({"visual_tokens": 64, "recycle": True}, 64),
        ({"visual_tokens": 192, "version": "v2"}, 192),
        ({"visual_tokens": 1}, 1),
        ({"visual_tokens": 10_000}, 576),
        ({"keep_ratio": 0.25}, 144),
        ({"keep_ratio": 1.0}, 576),
        ({"visual_tokens": 32, "method": "random"}, 32),
        ({"visual_tokens": 32, "method": "uniform"}, 32),
        ({"visual_tokens": 32, "method": "fastv"}, 32),
        ({"visual_tokens": 48, "score_layer": 0}, 48),
    ],
)
def test_budget_sets_prompt_length(chat: Chat, images, knob, kept):
    full = chat(images[:2], Q1)
    pruned = chat(images[:2], Q1, knob)
    assert pruned.status == 200, pruned.body
    assert full.prompt_tokens - pruned.prompt_tokens == 2 * (576 - kept)
    assert pruned.image_tokens == 2 * kept


# 3. No cross-question cache leaks ---------------------------------------------------------------
def test_two_questions_same_image_sequential_and_concurrent(chat: Chat, fresh_chat: Chat, images):
    img = images[2:3]
    knob = {"visual_tokens": 64}
    # Q1 first here, Q2 first in the fresh engine: each order sees the other's leftovers.
    seq = [chat(img, Q1, knob), chat(img, Q2, knob)]
    fresh = [None, fresh_chat(img, Q2, knob)]
    fresh[0] = fresh_chat(img, Q1, knob)
    both = chat.many([(img, Q1, knob), (img, Q2, knob)])
    for got in (seq, both):
        assert_same_answer(got[0], fresh[0])
        assert_same_answer(got[1], fresh[1])
    # The two questions really select differently (otherwise this test could not fail).
    assert seq[0].logprobs[0] != pytest.approx(seq[1].logprobs[0], abs=LOGPROB_TOL)


def test_prefix_cache_still_works_for_repeats(chat: Chat, images):
    knob = {"visual_tokens": 300}  # > one KV block (128 tokens on CPU) so a hit is visible
    first = chat(images[1:2], "Is there a blue square?", knob)
    again = chat(images[1:2], "Is there a blue square?", knob)
    assert_same_answer(first, again)
    assert again.body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# 4. Text guidance is real ----------------------------------------------------------------------
def red_block_image() -> tuple[Image.Image, set[int]]:
    """A 6x6-patch red square on a light background, aligned to the 14-px patch grid."""
    img = Image.new("RGB", (336, 336), BACKGROUND)
    rows, cols = range(10, 16), range(4, 10)
    ImageDraw.Draw(img).rectangle([14 * 4, 14 * 10, 14 * 10 - 1, 14 * 16 - 1], fill=RED)
    return img, {r * 24 + c for r in rows for c in cols}


def test_sparsevlm_keeps_the_patches_the_question_names(guided_server):
    chat = Chat(guided_server)
    img, red = red_block_image()
    trace = guided_server.trace_path
    kept_red = {}
    for method in ("sparsevlm", "random", "uniform"):
        trace.write_text("")
        knob = {"method": method, "visual_tokens": 36, "score_layer": 0, "recycle": False}
        assert chat([img], "Where is the red square?", knob).status == 200
        (record,) = [json.loads(line) for line in trace.read_text().splitlines()]
        assert record["method"] == method and len(record["kept"]) == 36
        kept_red[method] = len(red & set(record["kept"]))
    assert kept_red["sparsevlm"] >= 34, kept_red
    assert kept_red["random"] <= 12, kept_red
    assert kept_red["uniform"] <= 12, kept_red


def red_objects_image() -> tuple[Image.Image, list[set[int]]]:
    """One big red square (6x6 patches) and three small ones (2x2) on the 14-px patch grid."""
    img = Image.new("RGB", (336, 336), BACKGROUND)
    draw = ImageDraw.Draw(img)
    objects = []
    for row, col, side in [(2, 2, 6), (3, 16, 2), (14, 5, 2), (18, 18, 2)]:
        draw.rectangle([14 * col, 14 * row, 14 * (col + side) - 1, 14 * (row + side) - 1], RED)
        objects.append({r * 24 + c for r in range(row, row + side) for c in range(col, col + side)})
    return img, objects


def test_coverage_keeps_a_token_on_every_red_object(guided_server):
    chat = Chat(guided_server)
    img, objects = red_objects_image()
    trace = guided_server.trace_path
    covered = {}
    for coverage in (0, 0.3):  # plain top-K, then spread
        trace.write_text("")
        knob = {"visual_tokens": 8, "score_layer": 0, "coverage": coverage}
        assert chat([img], "How many red squares are there?", knob).status == 200
        (record,) = [json.loads(line) for line in trace.read_text().splitlines()]
        kept = set(record["kept"])
        assert len(kept) == 8 and kept <= set().union(*objects)  # all on red, both ways
        covered[coverage] = [len(kept & o) for o in objects]
    assert all(n >= 1 for n in covered[0.3]), covered  # every relevant object keeps a token
    assert any(n == 0 for n in covered[0]), covered  # plain top-K piles onto fewer objects


def test_server_default_knob_applies_only_without_a_knob(guided_server):
    chat = Chat(guided_server)
    img, _ = red_block_image()
    assert chat([img], Q1).image_tokens == 100  # SPARSEVLM_DEFAULT
    assert chat([img], Q1, {"visual_tokens": 20}).image_tokens == 20  # the request's own knob wins
    assert chat([img], Q1, {"method": "off"}).image_tokens == 576  # explicit off beats the default


# 5. Mixed batches ------------------------------------------------------------------------------
def test_mixed_batch_equals_solo(chat: Chat, images):
    requests = [
        (images[:1], Q1, None),
        (images[:1], Q2, {"visual_tokens": 64, "recycle": True}),
        (images[1:2], Q1, {"visual_tokens": 32, "method": "random"}),
        (images[:2], Q2, {"keep_ratio": 0.1, "version": "v2"}),
        (images[1:3], Q1, {"visual_tokens": 100, "method": "fastv"}),
        (images[2:3], "Describe the image in detail.", {"method": "off"}),
    ]
    solo = [chat(*r) for r in requests]
    batched = chat.many(requests)
    for s, b in zip(solo, batched, strict=True):
        assert_same_answer(s, b)
        assert s.prompt_tokens == b.prompt_tokens


# 6. Bad knobs are 400s that name the field -----------------------------------------------------
@pytest.mark.parametrize(
    ("knob", "field", "words"),
    [
        ({"visual_tokens": 64, "colour": "red"}, "sparsevlm.colour", "Extra inputs"),
        ({"visual_tokens": "many"}, "sparsevlm.visual_tokens", "integer"),
        ({"visual_tokens": 0}, "sparsevlm.visual_tokens", "greater than or equal to 1"),
        ({"keep_ratio": 0.0}, "sparsevlm.keep_ratio", "greater than 0"),
        ({"keep_ratio": 1.5}, "sparsevlm.keep_ratio", "less than or equal to 1"),
        ({"visual_tokens": 8, "keep_ratio": 0.5}, "sparsevlm", "not both"),
        ({"visual_tokens": 8, "method": "magic"}, "sparsevlm.method", "'sparsevlm'"),
        ({"visual_tokens": 8, "version": "v3"}, "sparsevlm.version", "'v1.5'"),
        ({"visual_tokens": 8, "scope": "chat"}, "sparsevlm.scope", "'turn' or 'prompt'"),
        ({"visual_tokens": 8, "score_layer": -1}, "sparsevlm.score_layer", "greater than"),
        ({"visual_tokens": 8, "score_layer": 32}, "sparsevlm.score_layer", "32 decoder layers"),
        ({"method": "sparsevlm"}, "sparsevlm", "needs a budget"),
        ("64", "sparsevlm", "expected an object"),
    ],
)
def test_bad_knob_is_400_naming_the_field(chat: Chat, images, knob, field, words):
    bad = chat(images[:1], Q1, knob)
    assert bad.status == 400, bad.body
    assert field in bad.error and words in bad.error, bad.error
    assert chat(images[:1], Q1, {"visual_tokens": 16}).status == 200


# 7. Counters -----------------------------------------------------------------------------------
def test_engine_counters_count_real_requests_exactly(chat: Chat, images):
    original = "sparsevlm_engine_visual_tokens_original_total"
    kept = "sparsevlm_engine_visual_tokens_kept_total"
    before = chat.metric(original), chat.metric(kept)
    script = [
        (images[:1], Q1, None, 576, 576),
        (images[:2], Q1, {"visual_tokens": 64}, 1152, 128),
        (images[:1], Q2, {"keep_ratio": 0.5, "method": "uniform"}, 576, 288),
        (images[:1], Q2, {"visual_tokens": 0}, 0, 0),  # rejected: not counted
    ]
    for imgs, q, knob, _, _ in script:
        chat(imgs, q, knob)
    after = chat.metric(original), chat.metric(kept)
    assert after[0] - before[0] == sum(s[3] for s in script) == 2304
    assert after[1] - before[1] == sum(s[4] for s in script) == 992
