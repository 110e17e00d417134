"""The bundled-model diagnostics: the linear probe reads what features hold and nothing more,
and the bundled model meets SparseVLM's premise at its default scoring layer and carries where
each patch is in its features (what "where" needs once pruning compacts the positions)."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from server.launch import BUNDLED_MODEL
from shapes.diagnose import linear_probe, object_patch_features, premise_recall


def test_linear_probe_reads_a_linear_label_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(900, 16, generator=gen)
    assert linear_probe(x, (x[:, 3] > 0).long()) > 0.95
    noise = torch.randint(0, 4, (900,), generator=gen)
    assert linear_probe(x, noise) < 0.4  # chance is 0.25


def test_bundled_model_attends_to_what_the_question_names_at_the_scoring_layer():
    model = LlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL).eval()
    processor = LlavaProcessor.from_pretrained(BUNDLED_MODEL)
    recall = premise_recall(model, processor, n=20, layers=(0, 2), budget=64)
    assert recall["raters"][1] > 0.9 and recall["last position"][1] > 0.9  # layer 2: grounded
    assert recall["raters"][0] < 0.5  # layer 0 was never grounded


def test_bundled_model_features_carry_where_the_object_is():
    model = LlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL).eval()
    x, labels = object_patch_features(model, 50)
    assert linear_probe(x, labels["quadrant"]) > 0.8  # majority class ~0.26
    assert linear_probe(x, labels["right half"]) > 0.9
