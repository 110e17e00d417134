"""One engine vs two replicas behind vllm-router, through ``sparsevlm serve`` (CPU).

Each setting is a real ``sparsevlm serve`` (engines with the plugin, the router when scaled, the
gateway) on the ~340 M LLaVA model of bench_speed.py. Measured per setting, through the gateway:
throughput at concurrency C over independent single-turn requests (a new image each, K = 64),
how those requests spread over the replicas (each engine's ``vllm:request_success_total``), and
three-turn conversations in turn scope: the prompt tokens of follow-up turns served from the
prefix cache, and whether every turn of a conversation reached one replica. Settings:

- ``1 engine``: ``sparsevlm serve`` as is; vLLM's automatic binding on 2 cores computes on one
  core and leaves the other to the API server and scheduler.
- ``1 engine, 2 cores``: the same with ``VLLM_CPU_OMP_THREADS_BIND=0-1`` (both cores compute).
- ``2 replicas``: ``--replicas 2``: one core each (serve binds them), router in front.

Writes docs/bench/replicas.md and docs/bench/replicas.json.

    .venv/bin/python benchmarks/bench_replicas.py [--requests 32] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_speed import build_model, image_question, run, streamed  # noqa: E402
from server.launch import EngineFailed, wait_healthy  # noqa: E402
from tests.vllm_server import free_port  # noqa: E402

KEY = "bench-key"
KNOB = {"visual_tokens": 64, "coverage": 0}  # top-K, as the other speed reports
TURN_KNOB = {**KNOB, "scope": "turn"}
QUESTIONS = ["What color is the circle?", "How many triangles are there?", "Is it blue?"]
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "1 engine": ([], {}),
    "1 engine, 2 cores": ([], {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}),
    "2 replicas": (["--replicas", "2"], {}),
}
OUT = ROOT / "docs" / "bench"
LOGS = ROOT / ".cache" / "bench-replicas-logs"


def request(model: str, text: str, knob: dict, max_tokens: int) -> dict[str, Any]:
    return {**streamed(model, image_question(text), max_tokens), "sparsity": knob}


def finished(engine: str) -> float:
    text = httpx.get(f"{engine}/metrics", timeout=30).text
    return sum(
        float(v) for v in re.findall(r"^vllm:request_success_total\{.*\} (\S+)$", text, re.M)
    )


class Serve:
    """``sparsevlm serve`` in a subprocess; its engines' URLs from its start-up lines."""

    def __init__(self, model: Path, flags: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        engine = ["--block-size", "32", "--max-num-seqs", "16"]
        cli = [sys.executable, "-m", "sparse_plugin.cli", "serve", "--model", str(model),
               "--port", str(self.port), "--api-key", KEY, *flags, "--", *engine]  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(
            cli, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT
        )

    def wait(self) -> list[str]:
        try:
            wait_healthy(self.url, self.proc, 900, "sparsevlm serve")
        except EngineFailed as exc:
            raise SystemExit(f"{exc}: {self.log.read_text()[-3000:]}") from None
        return re.findall(
            r"^sparsevlm: starting .* at (http://\S+) \.\.\.$", self.log.read_text(), re.M
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


async def conversation(client: httpx.AsyncClient, url: str, model: str) -> list[dict]:
    """Three turns in turn scope; each turn's usage."""
    messages: list[dict] = []
    usages = []
    for turn, question in enumerate(QUESTIONS):
        body = request(model, question, TURN_KNOB, 8)
        if turn:  # follow-ups: text only, the conversation so far resent
            body["messages"] = [*messages, {"role": "user", "content": question}]
        body["stream"] = False
        body.pop("stream_options")
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        messages = [
            *body["messages"],
            {"role": "assistant", "content": data["choices"][0]["message"]["content"]},
        ]
        usages.append(data["usage"])
    return usages


def measure(name: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    flags, env = SETTINGS[name]
    t0 = time.monotonic()
    serve = Serve(
        model, flags, env, LOGS / f"replicas-{name.replace(' ', '_').replace(',', '')}.log"
    )
    try:
        engines = serve.wait()
        started = time.monotonic() - t0
        served = model.name
        headers = {"Authorization": f"Bearer {KEY}"}
        asyncio.run(
            run(serve.url, [request(served, "Warm up.", KNOB, 4) for _ in range(2)], 2, headers)
        )
        before = [finished(e) for e in engines]
        bodies = [
            request(served, f"{QUESTIONS[0]} ({i})", KNOB, args.max_tokens)
            for i in range(args.requests)
        ]
        t1 = time.perf_counter()
        results = asyncio.run(run(serve.url, bodies, args.concurrency, headers))
        wall = time.perf_counter() - t1
        spread = [finished(e) - b for e, b in zip(engines, before, strict=True)]
        convs, same_replica = [], 0
        for _ in range(args.conversations):  # one at a time: metrics deltas name the replica
            before = [finished(e) for e in engines]

            async def one() -> list[dict]:
                async with httpx.AsyncClient(timeout=600, headers=headers) as client:
                    return await conversation(client, serve.url, served)

            convs.append(asyncio.run(one()))
            took = [finished(e) - b for e, b in zip(engines, before, strict=True)]
            same_replica += sorted(took)[-1] == len(QUESTIONS)
        follow = [u for c in convs for u in c[1:]]
        return {
            "setting": name,
            "replicas": len(engines),
            "start_s": round(started, 1),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "wall_s": round(wall, 2),
            "requests_per_s": round(args.requests / wall, 3),
            "output_tokens_per_s": round(args.requests * args.max_tokens / wall, 1),
            "median_e2e_s": round(sorted(r[1] for r in results)[len(results) // 2], 2),
            "requests_per_replica": spread,
            "conversations": args.conversations,
            "conversations_on_one_replica": same_replica,
            "follow_up_prompt_tokens": sum(u["prompt_tokens"] for u in follow),
            "follow_up_cached_tokens": sum(
                u["prompt_tokens_details"]["cached_tokens"] for u in follow
            ),
            "follow_up_cached_per_turn": [
                [u["prompt_tokens_details"]["cached_tokens"] for u in c[1:]] for c in convs
            ],
        }
    finally:
        serve.stop()


def write_report(rows: list[dict], meta: dict[str, Any]) -> None:
    base = rows[0]["requests_per_s"]
    lines = [
        "# One engine vs two replicas behind vllm-router (CPU)",
        "",
        f"Machine: {meta['machine']}; load average before the run {meta['load']}. Model: the "
        "~340 M random-weight LLaVA of bench_speed.py, fp32. Every setting is a real `sparsevlm "
        "serve` (plugin engines, vllm-router with `consistent_hash` when scaled, the gateway), "
        f"measured through the gateway: {meta['requests']} independent requests (a new image "
        f"each, K = 64 top-K, {meta['max_tokens']} output tokens) at concurrency "
        f"{meta['concurrency']}, then {meta['conversations']} three-turn conversations one at a "
        "time in turn scope (KV blocks of 32). Total run time "
        f"{meta['total_s']:.0f} s.",
        "",
        f"    {meta['command']}",
        "",
        "| setting | compute cores per engine | requests/s | vs 1 engine | output tokens/s "
        "| median latency (s) | requests per replica | follow-up prompt tokens from cache "
        "| conversations on one replica | start (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cores = {"1 engine": "1 (+1 reserved)", "1 engine, 2 cores": "2", "2 replicas": "1 each"}
    for r in rows:
        share = r["follow_up_cached_tokens"] / max(r["follow_up_prompt_tokens"], 1)
        spread = "/".join(f"{n:.0f}" for n in r["requests_per_replica"])
        lines.append(
            f"| {r['setting']} | {cores[r['setting']]} | {r['requests_per_s']:.3f} | "
            f"{r['requests_per_s'] / base:.2f}× | {r['output_tokens_per_s']:.1f} | "
            f"{r['median_e2e_s']:.2f} | {spread} | "
            f"{r['follow_up_cached_tokens']} of {r['follow_up_prompt_tokens']} ({share:.0%}) | "
            f"{r['conversations_on_one_replica']} of {r['conversations']} | {r['start_s']} |"
        )
    lines += ["", "Cached tokens per follow-up turn (turns 2 and 3 of each conversation):", ""]
    lines += [f"- {r['setting']}: {r['follow_up_cached_per_turn']}" for r in rows]
    (OUT / "replicas.md").write_text("\n".join(lines) + "\n")
    (OUT / "replicas.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--model-dir", default=str(ROOT / ".cache" / "bench-llava-340m"))
    args = ap.parse_args()
    model = build_model(Path(args.model_dir))
    LOGS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "command": "python " + " ".join(["benchmarks/bench_replicas.py", *sys.argv[1:]]),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "conversations": args.conversations,
    }
    t0 = time.monotonic()
    rows = []
    for name in args.settings:
        rows.append(measure(name, model, args))
        print(json.dumps(rows[-1]), flush=True)  # noqa: T201
    meta["total_s"] = round(time.monotonic() - t0, 1)
    write_report(rows, meta)


if __name__ == "__main__":
    main()
