"""Training-only pieces of the bundled model's trainer: the objects a question names, the
visual-token subsets of token-dropping augmentation, and the grounding loss checked against HF's
own attention weights, which question positions are grounded, and the ViT position code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from shapes.task import named_objects, naming_end, patch_labels, sample
from shapes.train import (
    N_VISUAL,
    Encoder,
    TrainConfig,
    add_position_code,
    grounding_loss,
    keep_indices,
    model_config,
    sincos_2d,
)
from sparse_plugin.fixtures.llava import build_tokenizer_and_processor


def test_named_objects_agree_with_the_answer():
    for index in range(300):
        s = sample("test", index)
        named = named_objects(s.question, s.objects)
        if s.kind == "color":
            assert [o.color for o in named] == [s.answer], s.question
        elif s.kind == "shape":
            assert [o.shape for o in named] == [s.answer], s.question
        elif s.kind == "exists":
            assert bool(named) == (s.answer == "yes"), s.question
        elif s.kind == "count":
            assert len(named) == int(s.answer), s.question
        else:
            assert [o.quadrant for o in named] == [s.answer], s.question


def test_focused_subsets_keep_object_patches_first():
    gen = torch.Generator().manual_seed(0)
    for index in range(20):
        s = sample("train", index)
        foreground = torch.from_numpy(patch_labels(s.objects)[0].flatten() > 0)  # (576,)
        n_fg = int(foreground.sum())
        for keep in (16, n_fg, n_fg + 40, 256):
            idx = keep_indices(s, keep, gen, focus=True)
            assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == keep
            assert int(foreground[idx].sum()) == min(keep, n_fg)  # every kept slot used on objects
        random_idx = keep_indices(s, 64, gen)  # without focus: foreground at its share, not all
        assert int(foreground[random_idx].sum()) < min(64, n_fg)
        assert len(random_idx) == 64 and bool((random_idx < N_VISUAL).all())


def test_grounding_loss_equals_hf_attention_mass():
    torch.manual_seed(0)
    cfg = TrainConfig(text_layers=3, vision_layers=1)
    config = model_config(cfg, vocab_size=64, image_token_id=63)
    config.text_config._attn_implementation = "eager"  # returns the attention weights
    lm = LlavaForConditionalGeneration(config).eval().model.language_model
    lengths, visual = (40, 33), slice(3, 23)
    x = torch.randn(2, max(lengths), cfg.text_hidden)
    mask = torch.zeros(2, max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    rng = np.random.default_rng(0)
    probes = [
        [(30, rng.random(20) < 0.3), (39, rng.random(20) < 0.3)],
        [(25, rng.random(20) < 0.3), (32, np.zeros(20, dtype=bool))],  # names nothing: skipped
    ]
    layer = 1
    with torch.no_grad():
        out = lm(inputs_embeds=x, attention_mask=mask, output_hidden_states=True,
                 output_attentions=True)  # fmt: skip
        got = grounding_loss(lm, out.hidden_states[layer], layer, visual, probes)
    attn = out.attentions[layer]  # (B, H, L, L)
    expected = [
        -torch.log(attn[b, :, p, visual].mean(0)[torch.from_numpy(m)].sum() + 1e-6)
        for b, row in enumerate(probes)
        for p, m in row
        if m.any()
    ]
    assert len(expected) == 3
    torch.testing.assert_close(got, torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "question, known",
    [
        ("What color is the square?", "What color is the square"),
        ("What shape is the yellow object?", "What shape is the yellow"),
        ("Is there a blue circle?", "Is there a blue circle"),
        ("How many triangles are there?", "How many triangles"),
        ("Where is the red square?", "Where is the red square"),
        ("Is it there?", ""),
    ],
)
def test_naming_end_is_where_the_question_has_named_its_objects(question, known):
    assert question[: naming_end(question)] == known


def test_question_positions_are_grounded_from_the_token_completing_the_last_name():
    enc = Encoder(build_tokenizer_and_processor())
    decode = enc.tok.decode
    for index in range(10):  # two of each question type
        question = sample("test", index).question
        known = question[: naming_end(question)]
        for asked in (enc.prompt(question)[1], enc.turn(question)):  # served turn, later turn
            t = enc.naming_token(asked, question)
            assert known in decode(asked[: t + 1]), (question, t)
            assert known not in decode(asked[:t]), (question, t)  # no earlier position knows
    assert (
        enc.naming_token(enc.turn("Is it there?"), "Is it there?")
        == len(enc.turn("Is it there?")) - 1
    )


def test_position_code_tells_columns_and_rows_apart_and_changes_only_patch_rows():
    code = sincos_2d(24, 64).view(24, 24, 64)  # (row, column, channel)
    column, row = code[..., :32], code[..., 32:]
    assert torch.equal(column[0], column[17]) and torch.equal(row[:, 0], row[:, 9])
    flat = code.reshape(576, 64)
    assert torch.cdist(flat, flat).add(torch.eye(576) * 1e9).min() > 0.1  # every patch distinct
    model = LlavaForConditionalGeneration(model_config(TrainConfig(), 472, 4))
    table = model.model.vision_tower.embeddings.position_embedding.weight
    before = table.detach().clone()
    add_position_code(model, 10.0)
    assert torch.equal(table[0], before[0])  # the CLS row is left alone
    torch.testing.assert_close(table[1:] - before[1:], 10.0 * flat)
