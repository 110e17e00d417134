"""Which text rates each image: prompt scope vs turn scope, and turn scope's stability."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_plugin.core.context import find, image_runs, item_contexts

IMG = 9
END = [7, 8]  # a two-token turn end ("ASSISTANT:")


def test_prompt_scope_rates_with_all_text_after_the_image():
    prompt = [1, 2, IMG, 3, 4, *END, 5, 6, *END]
    assert item_contexts(prompt, IMG) == [([1, 2], [3, 4, 7, 8, 5, 6, 7, 8])]


def test_turn_scope_stops_after_the_first_turn_end_after_the_image():
    prompt = [1, 2, IMG, 3, 4, *END, 5, 6, *END]
    assert item_contexts(prompt, IMG, END) == [([1, 2], [3, 4, 7, 8])]


def test_turn_scope_without_a_turn_end_falls_back_to_prompt_scope():
    prompt = [1, IMG, 3, 4, 5]
    assert item_contexts(prompt, IMG, END) == item_contexts(prompt, IMG) == [([1], [3, 4, 5])]


def test_images_in_different_turns_and_expanded_runs_leave_each_other_out():
    # image A (expanded to 3 tokens) in turn 1, image B in turn 2, a turn end after each
    prompt = [1, IMG, IMG, IMG, 2, *END, 3, 4, IMG, 5, *END]
    a, b = item_contexts(prompt, IMG, END)
    assert a == ([1], [2, 7, 8])
    assert b == ([1, 2, 7, 8, 3, 4], [5, 7, 8])
    # prompt scope: each image's suffix runs to the end, other images removed
    assert item_contexts(prompt, IMG)[0] == ([1], [2, 7, 8, 3, 4, 5, 7, 8])


def test_runs_and_find():
    assert image_runs([IMG, 1, IMG, IMG, 2], IMG) == [(0, 1), (2, 4)]
    assert find([1, 7, 7, 8], END) == 2 and find([1, 7], END) == -1 and find([1], []) == -1


tokens = st.lists(st.integers(0, 8), max_size=12)  # may contain turn-end pieces, never IMG


@settings(max_examples=200, deadline=None)
@given(before=tokens, question=tokens, later=st.lists(tokens, max_size=4))
def test_later_turns_never_change_an_earlier_images_turn_context(before, question, later):
    """A chat client resends the conversation and appends to it: contexts stay put."""
    first = [*before, IMG, *question, *END]
    longer = first + [t for turn in later for t in (*turn, *END)]
    assert item_contexts(longer, IMG, END) == item_contexts(first, IMG, END)
