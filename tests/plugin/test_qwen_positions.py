"""Qwen-VL M-RoPE positions (2.5-VL, 3-VL) and Qwen3-VL's DeepStack after pruned images,
checked against HF transformers.

The reference runs without vLLM: HF's own vision tower and language model, the image features
cut to the same K tokens (the ``uniform`` method: its indices depend only on the grid, so the
reference can pick them independently of the engine), and positions written out by hand from
the rule in docs/ALGORITHM.md: text and pruned images advance one position per token on all
three axes; an unpruned image keeps its (t, h, w) grid and the text after it resumes at max + 1.
For Qwen3-VL the reference also hands HF's decoder the DeepStack features of exactly the kept
tokens, at the kept tokens' positions. Greedy tokens and their logprobs from the engine must
equal the reference's. The same reference with vLLM's *unpruned-style* positions (the grid
extent kept), or with the DeepStack features of other tokens, must not match, or this test could
not catch a wrong position rule or a wrong DeepStack selection.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from sparse_plugin.core import uniform_indices
from tests.conftest import shapes_video, video_data_url
from tests.plugin.conftest import Answer, Chat, chat_body, shapes_image
from tests.plugin.qwen_reference import QwenReference

pytestmark = pytest.mark.engine

QUESTION = "What shape is the red object?"
STEPS = 4
LOGPROB_TOL = 2e-3  # vLLM's CPU attention vs. PyTorch SDPA, fp32
FAMILIES = {
    "qwen2.5-vl": ("qwen_server", Qwen2_5_VLForConditionalGeneration),
    "qwen3-vl": ("qwen3_server", Qwen3VLForConditionalGeneration),
}


@torch.no_grad()
def greedy(ref: QwenReference, seq) -> tuple[list[int], list[float]]:
    """STEPS greedy tokens of HF's decoder after ``seq``, with their logprobs."""
    tokens, logprobs = [], []
    for _ in range(STEPS):
        logp = torch.log_softmax(ref.logits(seq)[-1].float(), -1)
        tok = int(logp.argmax())
        tokens.append(tok)
        logprobs.append(float(logp[tok]))
        seq = seq.extended(ref.embed(torch.tensor([tok])))
    return tokens, logprobs


@torch.no_grad()
def reference_answer(
    ref: QwenReference,
    images: list[Image.Image],
    budget: int,
    compact: bool = True,
    deepstack: str = "kept",
) -> tuple[list[int], list[float]]:
    """Greedy (token ids, logprobs); every image of more than ``budget`` tokens pruned.

    ``deepstack``: "kept" (the kept tokens' own levels, as the model must get them) or
    "first" (the levels of the first K tokens instead: a wrong selection the test must see).
    """
    x = ref.inputs(images, QUESTION)
    seq = ref.sequence(
        x,
        lambda n, grid, modality: uniform_indices(n, budget, grid) if budget < n else None,
        compact=compact,
        deepstack_rows=(lambda kept: torch.arange(len(kept))) if deepstack == "first" else None,
    )
    return greedy(ref, seq)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(fixture_models: dict[str, Path], family: str) -> QwenReference:
    return QwenReference(fixture_models[family], FAMILIES[family][1])


@pytest.fixture(scope="module")
def qwen_chat(family: str, request) -> Chat:
    return Chat(request.getfixturevalue(FAMILIES[family][0]))


def engine_answer(chat: Chat, images, budget: int):
    body = chat_body(chat.model, images, QUESTION, {"visual_tokens": budget, "method": "uniform"})
    body |= {"max_tokens": STEPS, "return_tokens_as_token_ids": True}
    r = httpx.post(f"{chat.server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    a = Answer(r.status_code, r.json())
    return [int(t.removeprefix("token_id:")) for t in a.tokens], a.logprobs


@pytest.mark.parametrize(
    ("sizes", "budget"),
    [
        ([(336, 336), (800, 600)], 40),  # two pruned images of different sizes
        ([(40, 30), (300, 900)], 20),  # a 6-token image left whole (grid), then a pruned one
        ([(1000, 260), (336, 336)], 150),  # first pruned, second (144 / 100 tokens) left whole
    ],
)
def test_positions_after_pruned_images_match_the_reference(
    qwen_chat: Chat, reference: QwenReference, sizes, budget
):
    images = [shapes_image(i).resize(s) for i, s in enumerate(sizes)]
    tokens, logprobs = engine_answer(qwen_chat, images, budget)
    ref_tokens, ref_logprobs = reference_answer(reference, images, budget)
    assert tokens == ref_tokens
    assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_TOL)
    # The rejected rule changes the numbers: this comparison can fail.
    _, wrong = reference_answer(reference, images, budget, compact=False)
    assert wrong != pytest.approx(logprobs, abs=LOGPROB_TOL)
    if reference.has_deepstack:  # so does handing the LM the DeepStack features of other tokens
        _, wrong = reference_answer(reference, images, budget, deepstack="first")
        assert wrong != pytest.approx(logprobs, abs=LOGPROB_TOL)


# -- videos (Qwen2.5-VL) --------------------------------------------------------------------------
def decoded(url: str, fps: float) -> tuple[np.ndarray, float]:
    """All frames of a video data URL, RGB, as OpenCV decodes them (the reference's input)."""
    raw = base64.b64decode(url.split(",", 1)[1])
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(raw)
        f.flush()
        capture = cv2.VideoCapture(f.name)
        frames = []
        while (got := capture.read())[0]:
            frames.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))
    return np.stack(frames), fps


@pytest.fixture(scope="module")
def video_reference(fixture_models: dict[str, Path]) -> QwenReference:
    return QwenReference(fixture_models["qwen2.5-vl"], Qwen2_5_VLForConditionalGeneration)


@torch.no_grad()
def reference_video_answer(
    ref: QwenReference, images, videos, budgets: dict[str, int], compact: bool = True
) -> tuple[list[int], list[float]]:
    """Greedy (token ids, logprobs), each item cut to its modality's ``uniform`` budget."""

    def select(n: int, grid: tuple[int, int], modality: str) -> torch.Tensor | None:
        k = budgets[modality]
        if k >= n:
            return None
        # the engine spreads a multi-frame video along its token order (no 2-D grid)
        return uniform_indices(n, k, grid if modality == "image" else None)

    x = ref.inputs(images, QUESTION, [decoded(url, fps) for url, fps in videos])
    seq = ref.sequence(x, select, compact=compact)
    return greedy(ref, seq)


CLIP_A = (8, 4.0, (224, 224))  # 288 tokens: 2 temporal steps of 12 x 12
CLIP_B = (10, 2.0, (200, 300))  # 700 tokens: 5 steps of 10 x 14 (time positions reach 16)


@pytest.mark.parametrize(
    ("sizes", "clips", "budgets"),
    [
        ([], [CLIP_A], {"image": 40, "video": 40}),  # a pruned video, then the question
        ([(336, 336)], [CLIP_A], {"image": 30, "video": 50}),  # pruned image, pruned video
        ([(800, 600)], [CLIP_B], {"image": 10_000, "video": 64}),  # whole image, pruned video
        ([(1000, 260)], [CLIP_B], {"image": 24, "video": 10_000}),  # pruned image, whole video
        ([], [CLIP_A, CLIP_B], {"image": 1, "video": 300}),  # whole 288, then pruned 700
    ],
)
def test_positions_after_pruned_videos_match_the_reference(
    qwen_server, video_reference: QwenReference, sizes, clips, budgets
):
    chat = Chat(qwen_server)
    images = [shapes_image(i).resize(s) for i, s in enumerate(sizes)]
    videos = [(video_data_url(shapes_video(i, f, size), fps=fps), fps) for i, (f, fps, size) in
              enumerate(clips)]  # fmt: skip
    knob = {"visual_tokens": budgets["image"], "video_tokens": budgets["video"]}
    body = chat_body(chat.model, images, QUESTION, knob | {"method": "uniform"})
    body["messages"][0]["content"][len(images) : len(images)] = [
        {"type": "video_url", "video_url": {"url": url}} for url, _ in videos
    ]
    body |= {"max_tokens": STEPS, "return_tokens_as_token_ids": True}
    r = httpx.post(f"{chat.server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    a = Answer(r.status_code, r.json())
    tokens = [int(t.removeprefix("token_id:")) for t in a.tokens]
    ref_tokens, ref_logprobs = reference_video_answer(video_reference, images, videos, budgets)
    assert tokens == ref_tokens
    assert a.logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_TOL)
    _, wrong = reference_video_answer(video_reference, images, videos, budgets, compact=False)
    assert wrong != pytest.approx(a.logprobs, abs=LOGPROB_TOL)
