"""The turn end read off each model's chat template, and that real conversations contain it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoProcessor

from sparse_plugin.core.context import find, item_contexts
from sparse_plugin.models._turns import turn_end_ids

ROOT = Path(__file__).resolve().parents[2]
MISTRAL_LIKE = (  # no generation prompt: the user turn's own closing tag marks the reply
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
)
NOTHING_AFTER = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(params=["shapes-llava", "llava-1.5", "llava-next", "qwen2.5-vl"])
def processor(request, fixture_models):
    path = ROOT / "models" / "shapes-llava" if request.param == "shapes-llava" else None
    return AutoProcessor.from_pretrained(path or fixture_models[request.param])


def conversation(turns: int) -> list[dict]:
    messages: list[dict] = []
    for i in range(turns):
        content: list[dict] = [{"type": "text", "text": f"What color is shape {i}?"}]
        if i == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": " red"}]})
    return messages


def test_turn_end_is_found_after_each_question_and_keeps_the_image_context(processor):
    tok = processor.tokenizer
    end = turn_end_ids(tok, processor.chat_template)
    assert end, "the chat template has a generation prompt: a turn end must be found"
    image = tok.convert_tokens_to_ids(processor.image_token)
    ids = {}
    for turns in (1, 3):
        text = processor.apply_chat_template(conversation(turns), add_generation_prompt=True)
        ids[turns] = tok.encode(text, add_special_tokens=False)
        assert ids[turns][-len(end) :] == end  # the generation prompt ends every request
    first, third = (item_contexts(ids[t], image, end) for t in (1, 3))
    assert first == third  # the image's context is the same in turn 1 and turn 3
    assert find(ids[3], end) < len(ids[1])  # and it was cut at the first turn end, not the last


def test_templates_without_a_generation_prompt(processor):
    tok = processor.tokenizer
    end = turn_end_ids(tok, MISTRAL_LIKE)
    assert tok.decode(end).strip() == "[/INST]"
    assert turn_end_ids(tok, NOTHING_AFTER) is None
    assert turn_end_ids(tok, None) is None
    assert turn_end_ids(tok, "{{ raise_exception('no') }}") is None
