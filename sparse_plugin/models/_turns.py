"""Where a user turn ends: the token ids a model's chat template puts before the assistant's reply.

Turn-scoped selection (``sparse_plugin/core/context.py``) cuts an image's rater text at the first
such marker after the image. The marker is read off the model's own chat template, the one vLLM
renders chat requests with: render a one-message conversation around a sentinel question, and
take the ids that follow the sentinel (``" ASSISTANT:"`` for LLaVA-1.5,
``"<|im_end|>\\n<|im_start|>assistant\\n"`` for Qwen2.5-VL, ``" [/INST]"`` for Mistral-style
templates). A template that cannot be read this way gives None: every image then falls back to
the prompt-scope rule, which is always correct, only never cached across turns.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.plugins.sparsevlm")

SENTINEL = "Sparsevlm sentinel question"


def turn_end_ids(tokenizer: Any, chat_template: str | None) -> list[int] | None:
    """Ids between a user's text and the assistant's reply under ``chat_template``, or None."""
    if not chat_template:
        return None
    # Plain-string content first: a template that takes only strings prints a list as its repr.
    for content in (SENTINEL, [{"type": "text", "text": SENTINEL}]):
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                chat_template=chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception:  # templates raise on content shapes they do not take; try the next
            continue
        if not isinstance(rendered, str) or rendered.count(SENTINEL) != 1 or "'type'" in rendered:
            continue
        end = rendered.index(SENTINEL) + len(SENTINEL)
        if not rendered[end:].strip():
            return None  # nothing marks the reply's start
        head = tokenizer.encode(rendered[:end], add_special_tokens=False)
        full = tokenizer.encode(rendered, add_special_tokens=False)
        if full[: len(head)] != head or len(full) == len(head):
            return None  # the marker's first token merges with the text before it
        return list(full[len(head) :])
    return None


def resolve_turn_end(info: Any) -> list[int] | None:
    """The turn-end ids of the model a vLLM processing ``info`` serves (logged once)."""
    tokenizer = info.get_tokenizer()
    template = None
    try:
        from vllm.renderers.hf import resolve_chat_template

        template = resolve_chat_template(tokenizer, None, None, model_config=info.ctx.model_config)
    except Exception:  # no template (a base model): turn structure is unknown
        logger.debug("no chat template to read the turn end from", exc_info=True)
    ids = turn_end_ids(tokenizer, template)
    if ids is None:
        logger.info(
            "SparseVLM: no turn end found in this model's chat template; scope 'turn' uses all "
            "the text after each image (as scope 'prompt')"
        )
    else:
        logger.info("SparseVLM: user turns end with %r (ids %s)", tokenizer.decode(ids), ids)
    return ids
