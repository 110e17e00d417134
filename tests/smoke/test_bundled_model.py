"""The bundled default model (models/shapes-llava) answers the shapes task through the server.

Checks that the committed checkpoint is the trained one and that vLLM serves it faithfully: on
held-out test questions, vLLM's greedy answers equal HF transformers' answers, and unpruned
accuracy is within sampling noise of what training reported on the validation split.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from server.launch import BUNDLED_MODEL, default_model
from shapes.task import chat_inputs, first_word, sample
from tests.conftest import image_data_url, serve_model
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

N = 60  # test questions (12 per type)


@pytest.fixture(scope="module")
def bundled_server() -> Iterator[VllmServer]:
    yield from serve_model(BUNDLED_MODEL, images_per_prompt=1)


def ask(server: VllmServer, i: int, sparsity: dict | None = None) -> str:
    s = sample("test", i)
    content = [{"type": "image_url", "image_url": {"url": image_data_url(s.image)}},
               {"type": "text", "text": s.question}]  # fmt: skip
    body = {"model": BUNDLED_MODEL.name, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    if sparsity:
        body["mm_processor_kwargs"] = {"sparsevlm": sparsity}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return first_word(r.json()["choices"][0]["message"]["content"] or "")


def majority_baseline(split: str, n: int) -> float:
    """Accuracy of always giving each question type's most common answer (no image needed)."""
    answers: dict[str, Counter] = {}
    for i in range(n):
        s = sample(split, i)
        answers.setdefault(s.kind, Counter())[s.answer] += 1
    return sum(c.most_common(1)[0][1] for c in answers.values()) / n


def test_the_bundled_model_is_the_default_and_was_trained():
    assert default_model() == BUNDLED_MODEL
    report = json.loads((BUNDLED_MODEL / "training.json").read_text())
    n = report["config"]["val_size"]
    # It looks at the image: clearly above what the question alone can give.
    assert report["val_accuracy_full_tokens"]["all"] > majority_baseline("val", n) + 0.05


def test_vllm_answers_equal_hf_and_match_the_training_report(bundled_server: VllmServer):
    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL)
    model = LlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    served, hf, truth = [], [], []
    for i in range(N):
        s = sample("test", i)
        served.append(ask(bundled_server, i))
        x = chat_inputs(processor, s)
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=4, do_sample=False)
        new = out[0, x["input_ids"].shape[1] :]
        hf.append(first_word(processor.tokenizer.decode(new, skip_special_tokens=True)))
        truth.append(s.answer)
    # Same greedy answers up to fp32 near-ties (vLLM's CPU kernels vs PyTorch SDPA).
    assert sum(a == b for a, b in zip(served, hf, strict=True)) >= N - 2, (served, hf)
    accuracy = sum(a == t for a, t in zip(served, truth, strict=True)) / N
    reported = json.loads((BUNDLED_MODEL / "training.json").read_text())
    assert accuracy >= reported["val_accuracy_full_tokens"]["all"] - 0.15, accuracy


def test_pruned_answers_stay_close(bundled_server: VllmServer):
    """SparseVLM at 192 of 576 tokens keeps the answers: over all question types (counting and
    "where" included) within 0.1 of the unpruned accuracy, and the answers about one object's
    attributes (colour, shape, presence) mostly unchanged."""
    samples = [sample("test", i) for i in range(N)]
    full = [ask(bundled_server, i) for i in range(N)]
    pruned = [ask(bundled_server, i, {"visual_tokens": 192}) for i in range(N)]
    attribute = [i for i, s in enumerate(samples) if s.kind in ("color", "shape", "exists")]

    def accuracy(answers: list[str], among: list[int]) -> float:
        return sum(answers[i] == samples[i].answer for i in among) / len(among)

    everything = list(range(N))
    assert accuracy(pruned, everything) >= accuracy(full, everything) - 0.1, (full, pruned)
    assert accuracy(pruned, attribute) >= accuracy(full, attribute) - 0.1, (full, pruned)
    assert sum(full[i] == pruned[i] for i in attribute) / len(attribute) >= 0.8  # mostly unchanged
    assert accuracy(pruned, everything) >= majority_baseline("test", N) + 0.3
