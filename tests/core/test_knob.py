"""The knob's defaults are the measured best ones (docs/BENCHMARKS.md), and its identity."""

from __future__ import annotations

from sparse_plugin.contract import DEFAULT_COVERAGE, SparsityKnob


def test_defaults_prompt_scope_v15_without_recycling():
    knob = SparsityKnob(visual_tokens=64)
    assert knob.scope == "prompt" and knob.version == "v1.5" and not knob.recycle_enabled
    assert SparsityKnob(visual_tokens=64, recycle=True).recycle_enabled
    assert not SparsityKnob(visual_tokens=64, recycle=True, method="random").recycle_enabled


def test_coverage_defaults_to_the_tuned_value_for_sparsevlm_only():
    assert SparsityKnob(visual_tokens=64).coverage_applied == DEFAULT_COVERAGE == 0.2
    assert SparsityKnob(visual_tokens=64, coverage=0).coverage_applied == 0.0  # plain top-K
    assert SparsityKnob(visual_tokens=64, method="fastv").coverage_applied == 0.0
    assert SparsityKnob(visual_tokens=64, method="fastv", coverage=0.5).coverage_applied == 0.5
    # the applied value is part of the identity: top-K and coverage never share a cache entry
    assert (
        SparsityKnob(visual_tokens=64).selection_identity()
        != SparsityKnob(visual_tokens=64, coverage=0).selection_identity()
    )
    assert (
        SparsityKnob(visual_tokens=64).selection_identity()
        == SparsityKnob(visual_tokens=64, coverage=DEFAULT_COVERAGE).selection_identity()
    )


def test_scope_decides_the_text_not_the_selection_identity():
    turn = SparsityKnob(visual_tokens=64, scope="turn")
    prompt = SparsityKnob(visual_tokens=64, scope="prompt")
    assert turn.selection_identity() == prompt.selection_identity()
    assert turn.canonical() != prompt.canonical()


def test_the_per_image_ceiling_bounds_every_budget():
    assert SparsityKnob(visual_tokens=64, max_visual_tokens=32).budget(576) == 32
    assert SparsityKnob(keep_ratio=1.0, max_visual_tokens=32).budget(576) == 32
    assert SparsityKnob(keep_ratio=0.5, max_visual_tokens=1000).budget(576) == 288
    assert SparsityKnob(visual_tokens=16, max_visual_tokens=32).budget(10) == 10
