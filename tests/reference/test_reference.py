"""The in-decoder reference generates on the LLaVA-1.5 fixture in every setting of the paper."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from server.launch import BUNDLED_MODEL
from shapes.task import chat_inputs, sample
from sparse_plugin.reference.llava import ReferenceSparseVLM, scaled_prune_layers

# Visual tokens after layers 2 / 6 / 15, worked out by hand from the lists and the cluster rule
# (v1.5 recycles: count = keep + int((int(0.3 D) + 1) / 10) + 1; v2 keeps exactly the list).
EXPECTED = {
    ("v1.5", 192): [309, 204, 113],
    ("v1.5", 128): [312, 117, 39],
    ("v1.5", 96): [249, 55, 27],
    ("v1.5", 64): [82, 32, 18],
    ("v2", 192): [300, 200, 118],
    ("v2", 128): [238, 108, 60],
    ("v2", 96): [246, 54, 28],
    ("v2", 64): [66, 34, 20],
}


@pytest.fixture(scope="module")
def llava(fixture_models):
    path = fixture_models["llava-1.5"]
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]}
    ]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(
        images=Image.new("RGB", (336, 336), (200, 30, 30)), text=text, return_tensors="pt"
    )
    return model, inputs


@pytest.mark.parametrize(("version", "setting"), list(EXPECTED))
def test_reference_counts_and_generation(llava, version, setting):
    model, inputs = llava
    ref = ReferenceSparseVLM(model, setting=setting, version=version)
    out = ref.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=5)
    assert out.visual_counts == EXPECTED[(version, setting)]
    eos = model.generation_config.eos_token_id
    assert len(out.tokens) == 5 or (1 <= len(out.tokens) < 5 and out.tokens[-1] == eos)
    assert all(0 <= t < model.config.text_config.vocab_size for t in out.tokens)


def test_reference_stops_at_eos_like_hf_generate():
    # The bundled model answers in one word then EOS; decoding on past EOS would glue a second
    # answer onto the first once special tokens are stripped.
    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL)
    model = LlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    x = chat_inputs(processor, sample("test", 0))
    ref = ReferenceSparseVLM(model, setting=192, version="v1.5")
    out = ref.generate(x["input_ids"], x["pixel_values"], max_new_tokens=8)
    eos = model.generation_config.eos_token_id
    assert out.tokens[-1] == eos and eos not in out.tokens[:-1] and len(out.tokens) < 8


def test_reference_first_token_matches_hf_when_pruning_is_a_no_op(llava):
    # keep every visual token but one at layer 31 only: layers 0..31 see the full prompt, so the
    # first token equals plain HF generation.
    model, inputs = llava
    ref = ReferenceSparseVLM(model, setting=192, recycle=False, prune_layers=(29, 30, 31))
    ref.lists = (100_000, 100_000, 100_000)
    out = ref.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=1)
    with torch.no_grad():
        hf = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
    assert out.tokens[0] == hf


def test_prune_layers_scale_to_other_depths():
    assert scaled_prune_layers(32) == (2, 6, 15)
    assert scaled_prune_layers(16) == (1, 3, 8)
    assert scaled_prune_layers(8) == (0, 2, 4)
