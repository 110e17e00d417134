"""Qwen2.5-VL M-RoPE positions after pruned images, checked against HF transformers (issue 5).

The reference runs without vLLM: HF's own vision tower and language model, the image features
cut to the same K tokens (the ``uniform`` method: its indices depend only on the grid, so the
reference can pick them independently of the engine), and positions written out by hand from
the rule in docs/ALGORITHM.md: text and pruned images advance one position per token on all
three axes; an unpruned image keeps its (t, h, w) grid and the text after it resumes at max + 1.
Greedy tokens and their logprobs from the engine must equal the reference's. The same reference
with vLLM's *unpruned-style* positions (the grid extent kept) must not match, or this test
could not catch a wrong position rule.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from sparse_plugin.core import uniform_indices
from tests.plugin.conftest import Answer, Chat, chat_body, shapes_image
from tests.vllm_server import VllmServer

pytestmark = pytest.mark.engine

QUESTION = "What shape is the red object?"
STEPS = 4
LOGPROB_TOL = 2e-3  # vLLM's CPU attention vs. PyTorch SDPA, fp32


class Reference:
    def __init__(self, model_dir: Path) -> None:
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32
        ).eval()
        self.config = self.model.config
        self.merge = self.config.vision_config.spatial_merge_size

    @torch.no_grad()
    def answer(self, images: list[Image.Image], budget: int, compact: bool = True):
        """Greedy (token ids, logprobs); every image of more than ``budget`` tokens pruned."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        x = self.processor(images=images, text=text, return_tensors="pt")
        feats = self.model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
        feats = feats.pooler_output
        ids = x["input_ids"][0].tolist()
        embed = self.model.model.language_model.embed_tokens
        rows: list[torch.Tensor] = []
        pos: list[list[int]] = []  # (t, h, w) per token
        nxt, i, image = 0, 0, 0
        while i < len(ids):
            if ids[i] != self.config.image_token_id:
                rows.append(embed(torch.tensor([ids[i]])))
                pos.append([nxt] * 3)
                nxt, i = nxt + 1, i + 1
                continue
            t, h, w = (int(v) for v in x["image_grid_thw"][image])
            h, w = h // self.merge, w // self.merge
            n = t * h * w
            f = feats[image]
            if budget < n:
                kept = uniform_indices(n, budget, (h, w))
                rows.append(f[kept])
                if compact:
                    pos += [[nxt + j] * 3 for j in range(budget)]
                    nxt += budget
                else:  # the rule we rejected: kept tokens on a grid, text after at grid extent
                    pos += [[nxt, int(k) // w + nxt, int(k) % w + nxt] for k in kept]
                    nxt += max(h, w)
            else:
                rows.append(f)
                pos += [[nxt, nxt + r, nxt + c] for r in range(h) for c in range(w)]
                nxt += max(h, w)
            i += n
            image += 1
        embeds = torch.cat(rows)[None]
        positions = torch.tensor(pos).T[:, None, :]  # (3, 1, L)
        tokens, logprobs = [], []
        for _ in range(STEPS):
            hidden = self.model.model.language_model(
                inputs_embeds=embeds, position_ids=positions, use_cache=False
            ).last_hidden_state
            logp = torch.log_softmax(self.model.lm_head(hidden[0, -1]).float(), -1)
            tok = int(logp.argmax())
            tokens.append(tok)
            logprobs.append(float(logp[tok]))
            embeds = torch.cat([embeds, embed(torch.tensor([[tok]]))], dim=1)
            step = positions[:, :, -1:].amax(0, keepdim=True).expand(3, -1, -1) + 1
            positions = torch.cat([positions, step], -1)
        return tokens, logprobs


@pytest.fixture(scope="module")
def reference(fixture_models: dict[str, Path]) -> Reference:
    return Reference(fixture_models["qwen2.5-vl"])


@pytest.fixture(scope="module")
def qwen_chat(qwen_server: VllmServer) -> Chat:
    return Chat(qwen_server)


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
        ([(1000, 260), (336, 336)], 150),  # first pruned, second (144 tokens) left whole
    ],
)
def test_positions_after_pruned_images_match_the_reference(
    qwen_chat: Chat, reference: Reference, sizes, budget
):
    images = [shapes_image(i).resize(s) for i, s in enumerate(sizes)]
    tokens, logprobs = engine_answer(qwen_chat, images, budget)
    ref_tokens, ref_logprobs = reference.answer(images, budget)
    assert tokens == ref_tokens
    assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_TOL)
    # The rejected rule changes the numbers: this comparison can fail.
    _, wrong = reference.answer(images, budget, compact=False)
    assert wrong != pytest.approx(logprobs, abs=LOGPROB_TOL)
