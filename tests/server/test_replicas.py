"""``sparsevlm serve --replicas 2`` (issue 20): two plugin engines behind vllm-router, the gateway
in front, real processes on loopback. Every turn of a conversation reaches one replica and gets
the prefix-cache hits a single engine gives it; independent conversations spread over both; a
dying child stops serve with exit 1 and leaves nothing behind; bad flags are exit 2 at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import SettingsError
from server.launch import EngineFailed, replica_devices, wait_healthy
from tests.conftest import BLOCK_SIZE, TEST_KV_BYTES
from tests.gateway_fixtures import API_KEY, gateway_settings, start_gateway
from tests.plugin.conftest import shapes_image
from tests.plugin.test_conversation_e2e import Conversation
from tests.server.test_hardening import children, cmdline
from tests.vllm_server import free_port

pytestmark = pytest.mark.engine
MODEL = "llava-1.5"
KNOB = {"visual_tokens": 64, "scope": "turn"}
QUESTIONS = ["What color is the circle?", "How many triangles are there?", "Is it blue?"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
_seeds = iter(range(9100, 9200))  # a picture per conversation that no other one shows


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    engines: list[str]  # replica i's URL
    pids: list[int]  # replica i's API server
    log: Path


def engine_port(pid: int) -> int:
    args = cmdline(pid).split()
    return int(args[args.index("--port") + 1])


@pytest.fixture(scope="module")
def served(fixture_models, tmp_path_factory) -> Iterator[Served]:
    port = free_port()
    cli = [sys.executable, "-m", "sparse_plugin.cli", "serve", "--replicas", "2",
           "--model", str(fixture_models[MODEL]), "--port", str(port), "--api-key", API_KEY,
           "--", "--block-size", str(BLOCK_SIZE), "--kv-cache-memory-bytes", str(TEST_KV_BYTES),
           "--max-num-seqs", "32"]  # fmt: skip
    log = tmp_path_factory.mktemp("replicas") / "serve.log"
    proc = subprocess.Popen(cli, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, timeout=600, what="sparsevlm serve")
        except EngineFailed as exc:
            pytest.fail(f"{exc}: {log.read_text()[-3000:]}")
        # replica i's port, as serve announced it (ports are free ones, in no particular order)
        text = log.read_text()
        ports = [
            int(m) for m in re.findall(r"\(replica \d+\) for \S+ at http://[\d.]+:(\d+)", text)
        ]
        by_port = {engine_port(p): p for p in children(proc.pid) if "api_server" in cmdline(p)}
        assert sorted(by_port) == sorted(ports) and len(ports) == 2 and "vllm-router" in text
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        yield Served(proc, url, urls, [by_port[port] for port in ports], log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)


def finished(engine: str) -> float:
    """Requests the engine has finished (its own counter, every finish reason)."""
    total = 0.0
    for line in httpx.get(f"{engine}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def chat(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict:
    r = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()


def converse(url: str) -> tuple[list[dict], list[int]]:
    """A three-turn chat about a new picture: each turn's request body and its cached tokens."""
    conv = Conversation(MODEL)
    bodies, cached = [], []
    for turn, question in enumerate(QUESTIONS):
        body = conv.next_body(question, [shapes_image(next(_seeds))] if turn == 0 else [])
        body["sparsity"] = KNOB
        data = chat(url, body)
        assert data["usage"]["visual_tokens"]["kept"] == 64
        reply = data["choices"][0]["message"]["content"]
        conv.messages.append({"role": "assistant", "content": reply})
        bodies.append(body)
        cached.append(data["usage"]["prompt_tokens_details"]["cached_tokens"])
    return bodies, cached


def replay(url: str, bodies: list[dict]) -> list[int]:
    return [chat(url, b)["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--replicas", "0"], "--replicas: expected a whole number ≥ 1, got '0'"),
        (["--replicas", "two"], "expected a whole number ≥ 1, got 'two'"),
        (
            ["--replicas", str(len(os.sched_getaffinity(0)) + 1)],
            "each engine needs its own CPU core",
        ),
        (["--replicas", "2", "--router-policy", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_replica_flags_are_one_line_and_exit_2_before_any_engine(flags, words):
    cli = [sys.executable, "-m", "sparse_plugin.cli", "serve", *flags]
    t0 = time.monotonic()
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and words in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 30  # no engine was started


def test_gpu_replicas_get_disjoint_devices(monkeypatch):
    """(No GPU here: the split alone.) Each engine sees only its own GPUs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert replica_devices(2, cpu=False) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert replica_devices(1, cpu=False) == [{}]  # one engine: today's behaviour
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(SettingsError, match="each engine needs its own GPU, and 1 is available"):
        replica_devices(2, cpu=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the operator's binding: as is
    assert replica_devices(2, cpu=True) == [{}, {}]


def test_follow_ups_reach_their_replica_and_its_prefix_cache(served):
    """Conversations until both replicas have served some (a hash of 2 workers: ≥ 4, ≤ 12):
    all turns of each on one replica, and cached tokens per turn exactly what a single engine
    gives the same requests (replayed on the other replica, which has never seen them)."""
    runs: list[tuple[int, list[dict], list[int]]] = []
    while len(runs) < 4 or (len({r for r, _, _ in runs}) < 2 and len(runs) < 12):
        before = [finished(e) for e in served.engines]
        bodies, cached = converse(served.url)
        after = [finished(e) for e in served.engines]
        took = [a - b for a, b in zip(after, before, strict=True)]
        assert sorted(took) == [0, len(QUESTIONS)], took  # every turn on one replica
        runs.append((took.index(len(QUESTIONS)), bodies, cached))
    assert {r for r, _, _ in runs} == {0, 1}, "independent conversations spread"

    gateways = [start_gateway(gateway_settings(e, None)) for e in served.engines]
    try:
        for replica, bodies, cached in runs:
            single = replay(gateways[1 - replica].url, bodies)
            assert cached == single, (replica, cached, single)
            assert cached[0] == 0 and all(c >= 2 * BLOCK_SIZE for c in cached[1:]), cached
    finally:
        for gateway in gateways:
            gateway.stop()


def test_a_client_session_id_keeps_different_openings_together(served):
    """A client's own X-Session-Id (e.g. a chat that trims its early turns) outranks the
    opening: four different first turns under one id reach one replica."""
    before = [finished(e) for e in served.engines]
    for _ in range(4):
        body = Conversation(MODEL).next_body("What is it?", [shapes_image(next(_seeds))])
        chat(served.url, {**body, "max_tokens": 1}, {"X-Session-Id": "client-chat-1"})
    took = [finished(e) - b for e, b in zip(served.engines, before, strict=True)]
    assert sorted(took) == [0, 4], took


def test_a_dying_replica_stops_serve_with_exit_1_and_leaves_nothing(served):
    """Runs last: kills replica 1's API server; serve exits 1 fast, and no process of either
    engine's group or of the router's is left."""
    groups = [os.getpgid(p) for p in children(served.proc.pid)]
    assert len(groups) == 3  # two engines and the router, each its own process group
    os.kill(served.pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    assert served.proc.wait(timeout=60) == 1 and time.monotonic() - t0 < 45
    assert "the vLLM engine (replica 1) exited" in served.log.read_text()
    for _ in range(30):  # SIGKILL is delivered at once; the exits take a moment
        left = [
            g
            for g in groups
            if subprocess.run(["pgrep", "-g", str(g)], capture_output=True).returncode == 0
        ]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"process groups left behind: {left}"
