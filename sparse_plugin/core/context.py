"""Which prompt text judges each image: the context handed to the raters and the probe.

An image's selection is a function of its own visual tokens and of this context only, so two
prompts that give an image the same context get the same selection — and can share every cache.

- ``prompt`` scope (the paper's rule): the text before the image, and all the text after it.
- ``turn`` scope: the text before the image, and the text after it only up to the end of the
  first *turn end* (the chat template's marker where the assistant's reply begins, e.g.
  ``" ASSISTANT:"`` or ``"<|im_end|>\\n<|im_start|>assistant\\n"``). Later turns of a
  conversation only append after that point, so the context — and the selection — stay put.
  A prompt without the marker after an image falls back to the ``prompt`` rule for that image.

Other items' tokens (images, videos) are left out of every context. Plain Python over token
ids (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence

Context = tuple[list[int], list[int]]  # (ids before the image, ids after it that rate it)


def image_runs(prompt: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image tokens (a run is one image, expanded or not)."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(prompt):
        if prompt[i] != image_token_id:
            i += 1
            continue
        j = i
        while j < len(prompt) and prompt[j] == image_token_id:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """Index of the first occurrence of ``needle`` in ``haystack``, or -1."""
    n = len(needle)
    if n == 0:
        return -1
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def item_contexts(
    prompt: Sequence[int],
    token_id: int,
    turn_end: Sequence[int] | None = None,
    drop: Sequence[int] = (),
) -> list[Context]:
    """(prefix, suffix) per image (or video) of ``prompt``, in order; ``turn_end`` selects turn
    scope.

    Args:
        prompt: the prompt's token ids (an item as one or more ``token_id`` each).
        token_id: the token an item's placeholder repeats (e.g. ``<image>``, ``<|video_pad|>``).
        turn_end: ids that end a user turn and open the assistant's reply; None = prompt scope.
        drop: placeholder ids of the other modalities, left out of every context too.
    """
    skip = {token_id, *drop}
    text = [t for t in prompt if t not in skip]
    contexts: list[Context] = []
    for start, _ in image_runs(prompt, token_id):
        cut = sum(1 for t in prompt[:start] if t not in skip)  # the run's position in ``text``
        suffix = text[cut:]
        if turn_end:
            at = find(suffix, turn_end)
            if at >= 0:
                suffix = suffix[: at + len(turn_end)]
        contexts.append((text[:cut], suffix))
    return contexts
