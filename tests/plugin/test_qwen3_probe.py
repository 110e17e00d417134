"""Qwen3-VL: the engine's scoring probe is the model's own attention, DeepStack and QK-norm
included, checked against HF transformers outside vLLM.

For one image and the default (prompt) scope, the probe's sequence is the whole unpruned prompt.
The reference runs HF's decoder on it with eager attention (DeepStack added after the first
layers by HF's own code, q and k normalised per head by HF's own modules), takes layer ℓ's
attention from the raters (the same rater rule, on HF's embeddings) to the visual tokens, and
keeps the top K of SparseVLM v1.5's scores. The engine's traced selection must be the same
tokens. The same reference without DeepStack, or without QK-norm, selects other tokens, so the
comparison can fail on either.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from sparse_plugin import core
from tests.plugin.conftest import Chat, shapes_image
from tests.plugin.qwen_reference import QwenReference, RefSequence
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

K = 24
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def reference(fixture_models: dict[str, Path]) -> QwenReference:
    return QwenReference(fixture_models["qwen3-vl"], Qwen3VLForConditionalGeneration, eager=True)


def hf_selection(ref: QwenReference, seq: RefSequence, layer: int) -> list[int]:
    attn = ref.forward(seq, output_attentions=True).attentions[layer][0]  # (H, L, L)
    span = seq.spans[0]
    p, n = span.offset, span.num_visual
    raters = core.select_raters(seq.embeds[p : p + n], seq.embeds[p + n :]) + p + n
    scores = core.score_v15(attn[:, raters, p : p + n])  # (N,)
    return core.top_k_sorted(scores, K).tolist()


@contextlib.contextmanager
def without_qk_norm(ref: QwenReference) -> Iterator[None]:
    attns = [layer.self_attn for layer in ref.lm.layers]
    saved = [(a.q_norm, a.k_norm) for a in attns]
    for a in attns:
        a.q_norm = a.k_norm = torch.nn.Identity()
    try:
        yield
    finally:
        for a, (q, k) in zip(attns, saved, strict=True):
            a.q_norm, a.k_norm = q, k


def traced(server: VllmServer) -> list[dict]:
    path = server.trace_path  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("size", [(336, 336), (800, 600)])
@pytest.mark.parametrize("layer", [1, 2, 3])  # after DeepStack level 0, after both, past them
def test_probe_selects_what_the_models_own_attention_selects(
    qwen3_server: VllmServer, reference: QwenReference, layer: int, size
):
    image = shapes_image(7).resize(size)
    before = len(traced(qwen3_server))
    answer = Chat(qwen3_server)([image], QUESTION, {"visual_tokens": K, "score_layer": layer})
    assert answer.status == 200, answer.body
    (record,) = traced(qwen3_server)[before:]

    seq = reference.sequence(reference.inputs([image], QUESTION), lambda n, grid: None)
    span = seq.spans[0]
    assert record["num_visual"] == span.num_visual
    assert record["context"] == [span.offset, len(seq.embeds) - span.offset - span.num_visual]
    expected = hf_selection(reference, seq, layer)
    assert record["kept"] == expected
    # Each of the two Qwen3 specifics changes the selection: the comparison can fail.
    assert hf_selection(reference, replace(seq, deepstack=None), layer) != expected
    with without_qk_norm(reference):
        assert hf_selection(reference, seq, layer) != expected
