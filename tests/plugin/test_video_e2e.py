"""Video pruning in a real vLLM engine (Qwen2.5-VL fixture): the plugin's guarantees, for videos.

Off == stock vLLM; each video's tokens equal an independent formula (vLLM's frame sampling, then
the checkpoint's resize and temporal patching) minus the savings, for several frame counts, rates
and sizes; per-question selection with no cache leaks; repeats hit the prefix cache; mixed
image + video requests and batches equal solo runs; bad video fields are 400s naming the field;
the engine counters count videos exactly; the temporal stage drops what repeats. Positions after
a pruned video are checked against HF transformers in test_qwen_positions.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparse_plugin.core import uniform_indices
from tests.conftest import BLOCK_SIZE, VIDEOS_PER_PROMPT, serve_model, shapes_video, video_data_url
from tests.plugin.conftest import LOGPROB_TOL, Chat, assert_same_answer, shapes_image
from tests.smoke.test_families import qwen_resized, qwen_tokens
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

Q1 = "What color is the moving circle?"
Q2 = "How many squares are there?"
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 100_352, 602_112  # the fixture's video processor, per frame

# (frames in the file, its fps, (width, height)) -> video tokens, checked by hand
CLIPS: dict[tuple[int, float, tuple[int, int]], int] = {
    (8, 4.0, (224, 224)): 288,  # 2 s -> 4 frames sampled (2 fps); 224² < min -> 336² -> 144 / step
    (16, 8.0, (320, 240)): 280,  # 2 s -> 4 frames; 320x240 -> 392x280 -> 140 per 2-frame step
    (10, 2.0, (200, 300)): 700,  # 5 s -> 10 frames (all); 200x300 -> 280x392 -> 5 steps of 140
    (12, 2.0, (448, 336)): 1152,  # 6 s -> 12 frames; 448x336 stays -> 6 steps of 192
}


def qwen_video_frames(total: int, fps: float) -> int:
    """Frames vLLM's Qwen2-VL loader samples: 2 per second of video, at least 4, at most every
    frame (768 at most), a whole number of 2-frame temporal patches."""
    most = min(768, total) // 2 * 2
    n = min(max(total / fps * 2, 4), most, total)
    return math.floor(n / 2) * 2


def qwen_video_tokens(total: int, fps: float, size: tuple[int, int]) -> int:
    """One token per 2 x 2 x 2 (frames x 14-px patches) block of the resized, sampled video."""
    w, h = qwen_resized(*size, lo=VIDEO_MIN_PIXELS, hi=VIDEO_MAX_PIXELS)
    return qwen_video_frames(total, fps) // 2 * (h // 14) * (w // 14) // 4


def clip(seed: int, spec: tuple[int, float, tuple[int, int]], moving: bool = True) -> str:
    frames, fps, size = spec
    return video_data_url(shapes_video(seed, frames, size, moving), fps=fps)


SPECS = list(CLIPS)
SHORT = SPECS[0]  # 288 tokens: the cheap clip most tests use


def traced(chat: Chat) -> list[dict]:
    path = chat.server.trace_path  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def chat(qwen_server: VllmServer) -> Chat:
    return Chat(qwen_server)


@pytest.fixture(scope="module")
def stock_server(fixture_models: dict[str, Path]) -> Iterator[VllmServer]:
    yield from serve_model(
        fixture_models["qwen2.5-vl"],
        plugins=False,
        max_model_len=8192,
        block_size=BLOCK_SIZE,
        videos_per_prompt=VIDEOS_PER_PROMPT,
    )


@pytest.fixture(scope="module")
def stock_chat(stock_server: VllmServer) -> Chat:
    return Chat(stock_server)


def test_video_formula_reproduces_the_hand_checked_table():
    assert {s: qwen_video_tokens(*s) for s in CLIPS} == CLIPS


# 1. Off == stock --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "knob",
    [
        None,
        {"method": "off"},
        {"video_tokens": 100_000},
        {"visual_tokens": 64, "video_tokens": 100_000},  # images would be pruned, videos whole
    ],
)
def test_unpruned_video_equals_stock_vllm(chat: Chat, stock_chat: Chat, knob):
    videos = (clip(0, SHORT),)
    ours, stock = chat([], Q1, knob, videos=videos), stock_chat([], Q1, videos=videos)
    assert ours.status == 200, ours.body
    assert ours.prompt_tokens == stock.prompt_tokens
    assert ours.video_tokens == stock.video_tokens == CLIPS[SHORT]
    assert ours.tokens == stock.tokens
    if knob is None or knob.get("method") == "off":
        assert ours.logprobs == stock.logprobs  # bit-identical: nothing was touched
    else:  # a no-op budget keys its own cache entries: a cold prefill vs a warm one
        assert ours.logprobs == pytest.approx(stock.logprobs, abs=LOGPROB_TOL)


# 2. Budgets shrink each video by exactly the independent formula minus K ------------------------
@pytest.mark.parametrize(
    ("knob", "kept"),
    [
        ({"video_tokens": 50}, lambda n: min(50, n)),
        ({"video_keep_ratio": 0.25}, lambda n: max(1, int(0.25 * n + 0.5))),
        ({"video_keep_ratio": 0.1, "version": "v2"}, lambda n: max(1, int(0.1 * n + 0.5))),
        ({"keep_ratio": 0.1, "method": "random"}, lambda n: max(1, int(0.1 * n + 0.5))),
        ({"video_tokens": 64, "method": "uniform"}, lambda n: min(64, n)),
        ({"video_tokens": 70, "method": "fastv"}, lambda n: min(70, n)),
        ({"video_tokens": 40, "method": "temporal"}, lambda n: min(40, n)),
        ({"video_tokens": 90, "temporal_threshold": 0.9}, lambda n: min(90, n)),
    ],
)
def test_video_tokens_are_formula_minus_savings(chat: Chat, knob, kept):
    for pair in [(SPECS[0], SPECS[1]), (SPECS[2], SPECS[3])]:
        videos = tuple(clip(i, spec) for i, spec in enumerate(pair))
        full, pruned = chat([], Q1, videos=videos), chat([], Q1, knob, videos=videos)
        assert pruned.status == 200, pruned.body
        n = [qwen_video_tokens(*spec) for spec in pair]
        assert full.video_tokens == sum(n)
        assert pruned.video_tokens == sum(kept(x) for x in n)
        assert full.prompt_tokens - pruned.prompt_tokens == sum(x - kept(x) for x in n)


def test_a_video_is_ranked_as_a_whole(chat: Chat):
    """One selection per video over all its frames' tokens, not a quota per frame."""
    before = len(traced(chat))
    assert chat([], Q2, {"video_tokens": 100}, videos=(clip(3, SPECS[3]),)).status == 200
    (record,) = traced(chat)[before:]
    assert record["modality"] == "video" and record["num_visual"] == CLIPS[SPECS[3]]
    assert len(record["kept"]) == 100
    per_step = [0] * 6  # 6 temporal steps of 192 tokens
    for k in record["kept"]:
        per_step[k // 192] += 1
    assert len(set(per_step)) > 1, per_step  # uneven: ranked over the whole video


# 3. No cross-question cache leaks ---------------------------------------------------------------
def test_each_question_gets_its_own_video_selection(chat: Chat):
    videos = (clip(4, SHORT),)
    knob = {"video_tokens": 48}
    before = len(traced(chat))
    first = [chat([], Q1, knob, videos=videos), chat([], Q2, knob, videos=videos)]
    records = traced(chat)[before:]
    assert len(records) == 2, "each question must run its own selection"
    assert records[0]["kept"] != records[1]["kept"]
    assert records[1]["vision"] == "hit"  # the vision tower ran once for the video
    again = [chat([], Q1, knob, videos=videos), chat([], Q2, knob, videos=videos)]
    both = chat.many([([], Q1, knob, 6, videos), ([], Q2, knob, 6, videos)])
    for got in (again, both):
        assert_same_answer(got[0], first[0])
        assert_same_answer(got[1], first[1])


def test_prefix_cache_still_works_for_video_repeats(chat: Chat):
    videos = (clip(5, SPECS[2]),)
    knob = {"video_tokens": 200}  # several 32-token KV blocks
    first = chat([], "Is there a blue square?", knob, videos=videos)
    again = chat([], "Is there a blue square?", knob, videos=videos)
    assert_same_answer(first, again)
    assert again.body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 192


# 4. Images and videos together ------------------------------------------------------------------
def test_image_and_video_budgets_apply_to_their_own_items(chat: Chat):
    img, videos = [shapes_image(6).resize((800, 600))], (clip(6, SHORT),)
    pruned = chat(img, Q1, {"visual_tokens": 20, "video_tokens": 60}, videos=videos)
    assert pruned.status == 200, pruned.body
    mm = pruned.body["usage"]["prompt_tokens_details"]["multimodal_tokens"]
    assert mm == {"image": 20, "video": 60}
    only_video = chat(img, Q1, {"video_keep_ratio": 0.5}, videos=videos)
    mm = only_video.body["usage"]["prompt_tokens_details"]["multimodal_tokens"]
    assert mm == {"image": qwen_tokens(800, 600), "video": CLIPS[SHORT] // 2}


def test_mixed_image_and_video_batch_equals_solo(chat: Chat):
    a, b = shapes_image(7), shapes_image(8).resize((800, 600))
    v1, v2 = clip(7, SHORT), clip(8, SPECS[1])
    requests = [
        ([], Q1, None, 6, (v1,)),
        ([a], Q2, {"visual_tokens": 40, "video_tokens": 30}, 6, (v1,)),
        ([b], Q1, {"visual_tokens": 32}, 6, ()),
        ([], Q2, {"video_keep_ratio": 0.25, "temporal_threshold": 0.9}, 6, (v1, v2)),
        ([a, b], Q1, {"keep_ratio": 0.2, "method": "fastv"}, 6, (v2,)),
        ([], Q2, {"video_tokens": 50, "method": "temporal"}, 6, (v2,)),
    ]
    chat.assert_batch_equals_solo(requests)


# 5. Bad video fields are 400s that name the field ----------------------------------------------
@pytest.mark.parametrize(
    ("knob", "field", "words"),
    [
        ({"video_tokens": 0}, "sparsevlm.video_tokens", "greater than or equal to 1"),
        ({"video_keep_ratio": 1.5}, "sparsevlm.video_keep_ratio", "less than or equal to 1"),
        ({"video_tokens": 8, "video_keep_ratio": 0.5}, "sparsevlm", "not both"),
        (
            {"method": "random", "video_tokens": 8, "temporal_threshold": 0.9},
            "sparsevlm.temporal_threshold",
            "needs method 'sparsevlm' or 'fastv'",
        ),
        ({"method": "off", "video_tokens": 8}, "sparsevlm", "takes no video_tokens"),
    ],
)
def test_bad_video_knob_is_400_naming_the_field(chat: Chat, knob, field, words):
    videos = (clip(0, SHORT),)
    bad = chat([], Q1, knob, videos=videos)
    assert bad.status == 400, bad.body
    assert field in bad.error and words in bad.error, bad.error
    assert chat([], Q1, {"video_tokens": 16}, videos=videos).status == 200


# 6. Counters ------------------------------------------------------------------------------------
def test_engine_counters_count_videos_exactly(chat: Chat):
    original = "sparsevlm_engine_visual_tokens_original_total"
    kept = "sparsevlm_engine_visual_tokens_kept_total"
    video = 'modality="video"'
    before = chat.metric(original, video), chat.metric(kept, video)
    v1, v2 = clip(9, SHORT), clip(9, SPECS[1])
    chat([], Q1, videos=(v1,))
    chat([shapes_image(9)], Q2, {"visual_tokens": 10, "video_tokens": 50}, videos=(v1, v2))
    chat([], Q2, {"video_tokens": 0}, videos=(v2,))  # rejected: not counted
    after = chat.metric(original, video), chat.metric(kept, video)
    assert after[0] - before[0] == 2 * CLIPS[SHORT] + CLIPS[SPECS[1]]
    assert after[1] - before[1] == CLIPS[SHORT] + 100


# 7. The temporal stage drops what repeats -------------------------------------------------------
def test_the_temporal_stage_sets_repeats_aside(chat: Chat):
    """A still clip repeats its first temporal step: the stage leaves exactly that step's tokens
    as candidates; a budget within it is spent there alone, a larger one takes all of it and
    tops up from the repeats by score. A moving clip adds the places the circle passes."""
    step = 192  # SPECS[3]: 6 temporal steps of 192 tokens
    still, moving = clip(10, SPECS[3], moving=False), clip(10, SPECS[3])
    before = len(traced(chat))
    for video, k in ((still, 64), (still, 300), (moving, 64)):
        knob = {"video_tokens": k, "temporal_threshold": 0.9}
        assert chat([], Q2, knob, videos=(video,)).status == 200
    assert chat([], Q2, {"video_tokens": 64, "method": "temporal"}, videos=(still,)).status == 200
    small, large, moved, temporal = traced(chat)[before:]
    assert small["novel"] == large["novel"] == step
    assert max(small["kept"]) < step and len(small["kept"]) == 64
    assert set(range(step)) <= set(large["kept"]) and len(large["kept"]) == 300
    assert step < moved["novel"] < 6 * step
    assert "novel" not in temporal and max(temporal["kept"]) < step  # EVS-like: first step


def test_uniform_spreads_a_video_along_its_tokens(chat: Chat):
    """A multi-frame video has no single 2-D grid: `uniform` spreads K along its token order even
    when N is a square (576 = 4 steps x 144 here), never over a made-up 24 x 24 grid."""
    spec = (8, 2.0, (224, 224))  # 4 s -> 8 frames -> 4 temporal steps of 12 x 12
    assert qwen_video_tokens(*spec) == 576
    before = len(traced(chat))
    knob = {"video_tokens": 64, "method": "uniform"}
    assert chat([], Q1, knob, videos=(clip(11, spec),)).status == 200
    (record,) = traced(chat)[before:]
    assert record["kept"] == uniform_indices(576, 64, None).tolist()
    assert record["kept"] != uniform_indices(576, 64, (24, 24)).tolist()
