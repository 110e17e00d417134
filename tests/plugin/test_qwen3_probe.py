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
from tests.plugin.conftest import Chat, chat_body, shapes_image
from tests.plugin.qwen_reference import QwenReference, RefSequence
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

K = 24
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def reference(fixture_models: dict[str, Path]) -> QwenReference:
    return QwenReference(fixture_models["qwen3-vl"], Qwen3VLForConditionalGeneration, eager=True)


def hf_scores(ref: QwenReference, seq: RefSequence, layer: int) -> torch.Tensor:
    """(N,) SparseVLM v1.5 scores of the first image's tokens from HF's own layer-ℓ attention."""
    attn = ref.forward(seq, output_attentions=True).attentions[layer][0]  # (H, L, L)
    span = seq.spans[0]
    p, n = span.offset, span.num_visual
    raters = core.select_raters(seq.embeds[p : p + n], seq.embeds[p + n :]) + p + n
    return core.score_v15(attn[:, raters, p : p + n])


def hf_selection(ref: QwenReference, seq: RefSequence, layer: int) -> list[int]:
    return core.top_k_sorted(hf_scores(ref, seq, layer), K).tolist()


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
    knob = {"visual_tokens": K, "score_layer": layer, "coverage": 0}  # top-K: as the reference
    answer = Chat(qwen3_server)([image], QUESTION, knob)
    assert answer.status == 200, answer.body
    (record,) = traced(qwen3_server)[before:]

    seq = reference.sequence(reference.inputs([image], QUESTION), lambda n, grid, modality: None)
    span = seq.spans[0]
    assert record["num_visual"] == span.num_visual
    assert record["context"] == [span.offset, len(seq.embeds) - span.offset - span.num_visual]
    expected = hf_selection(reference, seq, layer)
    assert record["kept"] == expected
    # Each of the two Qwen3 specifics changes the selection: the comparison can fail.
    assert hf_selection(reference, replace(seq, deepstack=None), layer) != expected
    with without_qk_norm(reference):
        assert hf_selection(reference, seq, layer) != expected


@torch.no_grad()
def recycled_reference(
    ref: QwenReference, image, layer: int, merged_deepstack: bool = True
) -> tuple[list[int], list[float]]:
    """Greedy answer of HF's decoder given the image cut by SparseVLM with recycling: the kept
    tokens then the cluster means, each row's DeepStack levels merged with the same clusters
    (``merged_deepstack=False``: none for the merged rows, a wrong rule the test must see)."""
    x = ref.inputs([image], QUESTION)
    full = ref.sequence(x, lambda n, grid, modality: None)
    span = full.spans[0]
    p, n = span.offset, span.num_visual
    out = ref.model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
    levels = [level[0] for level in out.deepstack_features]
    rows = torch.cat([out.pooler_output[0], *levels], dim=-1)  # (N, d·(1 + levels))
    chosen = core.select_visual_tokens(rows, hf_scores(ref, full, layer), K, recycle=True)
    assert len(chosen.recycled) > 0
    recycled = chosen.recycled.clone()
    if not merged_deepstack:
        recycled[:, full.embeds.shape[1] :] = 0
    cut = torch.cat([rows[chosen.kept], recycled]).split(full.embeds.shape[1], dim=-1)
    after = full.embeds[p + n :]
    seq = RefSequence(
        embeds=torch.cat([full.embeds[:p], cut[0], after]),
        positions=[[i] * 3 for i in range(p + K + len(after))],  # text and a pruned image: 1-D
        visual=[False] * p + [True] * K + [False] * len(after),
        deepstack=list(cut[1:]),
        spans=[],
        text_ids=full.text_ids,
    )
    tokens, logprobs = [], []
    for _ in range(4):
        logp = torch.log_softmax(ref.logits(seq)[-1].float(), -1)
        tokens.append(int(logp.argmax()))
        logprobs.append(float(logp[tokens[-1]]))
        seq = seq.extended(ref.embed(torch.tensor([tokens[-1]])))
    return tokens, logprobs


@pytest.mark.parametrize("size", [(336, 336), (800, 600)])
def test_recycled_tokens_carry_their_clusters_deepstack(
    qwen3_server: VllmServer, reference: QwenReference, size
):
    image = shapes_image(8).resize(size)
    knob = {"visual_tokens": K, "recycle": True, "coverage": 0}
    body = chat_body(Chat(qwen3_server).model, [image], QUESTION, knob, max_tokens=4)
    answer = Chat(qwen3_server).post(body | {"return_tokens_as_token_ids": True})
    assert answer.status == 200, answer.body
    assert answer.image_tokens == K
    tokens = [int(t.removeprefix("token_id:")) for t in answer.tokens]
    ref_tokens, ref_logprobs = recycled_reference(reference, image, layer=2)
    assert tokens == ref_tokens
    assert answer.logprobs == pytest.approx(ref_logprobs, abs=2e-3)
    _, wrong = recycled_reference(reference, image, layer=2, merged_deepstack=False)
    assert wrong != pytest.approx(answer.logprobs, abs=2e-3)  # the comparison can fail
