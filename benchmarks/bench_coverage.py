"""Tuning the coverage knob on the validation split (the test split is kept for bench_accuracy).

For SparseVLM v1.5 (layer 2, no recycling: the served default), sweeps ``coverage`` c at small
budgets on validation questions through the serving path, per question type. The value chosen
here is the one bench_accuracy.py then measures once on the test split.
Writes docs/bench/coverage_tuning.{md,json,png}.

    .venv/bin/python benchmarks/bench_coverage.py [--questions 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _stack import start_stack  # noqa: E402
from bench_accuracy import ask_all, score  # noqa: E402

from shapes.task import QUESTION_TYPES, sample  # noqa: E402

BUDGETS = (64, 32)
COVERAGES = (None, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # None: plain top-K


def label(c: float | None) -> str:
    return "top-K" if c is None else f"coverage {c}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "shapes-llava")
    parser.add_argument("--questions", type=int, default=500, help="validation questions")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()

    t0 = time.monotonic()
    samples = [sample("val", i) for i in range(args.questions)]
    url, key, _, stop = start_stack(args.model, "bench-coverage")
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:

        def ask(knob: dict) -> dict[str, float]:
            answers = asyncio.run(
                ask_all(url, key, args.model.name, samples, knob, args.concurrency)
            )
            return score(samples, answers)

        full = ask({"method": "off"})
        for c in COVERAGES:
            results[label(c)] = {}
            for b in BUDGETS:
                knob = {"visual_tokens": b} | ({"coverage": c} if c is not None else {})
                results[label(c)][str(b)] = ask(knob)
                print(f"{label(c)} @{b}: {results[label(c)][str(b)]['all']:.3f}", flush=True)  # noqa: T201
    finally:
        stop()
    meta = {
        "model": str(args.model.relative_to(ROOT)),
        "questions": args.questions,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, vLLM-CPU fp32",
        "minutes": round((time.monotonic() - t0) / 60, 1),
        "command": "python benchmarks/bench_coverage.py"
        + (f" --questions {args.questions}" if args.questions != 500 else ""),
    }
    write_report(full, results, meta, args.out)


def write_report(full: dict, results: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage_tuning.json").write_text(
        json.dumps({"meta": meta, "full": full, "results": results}, indent=2)
    )
    types = " | ".join(QUESTION_TYPES)
    lines = [
        "# Coverage tuning (validation split, through the server)",
        "",
        f"Model `{meta['model']}`; {meta['questions']} validation questions "
        f"({meta['questions'] // len(QUESTION_TYPES)} per type); SparseVLM v1.5, score layer 2, "
        f"no recycling; greedy, first word scored. Machine: {meta['machine']}; "
        f"{meta['minutes']} min. Command: `{meta['command']}`.",
        "",
        f"Unpruned: {full['all']:.3f} ("
        + ", ".join(f"{k} {full[k]:.2f}" for k in QUESTION_TYPES)
        + ").",
    ]
    for b in BUDGETS:
        lines += ["", f"At {b} visual tokens:", "", f"| selection | all | % of full | {types} |",
                  "|---|---|---|" + "---|" * len(QUESTION_TYPES)]  # fmt: skip
        for name, row in results.items():
            acc = row[str(b)]
            cells = " | ".join(f"{acc[k]:.2f}" for k in QUESTION_TYPES)
            lines.append(f"| {name} | {acc['all']:.3f} | {100 * acc['all'] / full['all']:.1f} "
                         f"| {cells} |")  # fmt: skip
    lines += ["", "![accuracy vs coverage](coverage_tuning.png)", ""]
    (out / "coverage_tuning.md").write_text("\n".join(lines))
    plot(full, results, out / "coverage_tuning.png")


def plot(full: dict, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BUDGETS), figsize=(11, 4), sharey=True)
    xs = [0.0 if c is None else c for c in COVERAGES]
    for ax, b in zip(axes, BUDGETS, strict=True):
        for kind in ("all", "count", "where"):
            ax.plot(xs, [results[label(c)][str(b)][kind] for c in COVERAGES], marker="o",
                    label=kind)  # fmt: skip
        ax.axhline(full["all"], color="grey", linewidth=0.8, linestyle=":", label="unpruned")
        ax.set_title(f"{b} visual tokens")
        ax.set_xlabel("coverage c (0 = plain top-K)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (validation)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
