"""vLLM general-plugin entry point: swaps in the SparseVLM model classes for known architectures.

vLLM runs ``register()`` in every process (API server, engine core, workers) and logs-and-swallows
a plugin's errors, which would mean silently unpruned serving; so we log one INFO line on success
and keep this function small enough to be obviously correct. Registration is lazy ("module:Class"),
so nothing model-related is imported in processes that never build a model.
"""

from __future__ import annotations

import logging
import os

# A child of "vllm" so the line appears wherever vLLM configures its logging.
logger = logging.getLogger("vllm.plugins.sparsevlm")

# HF architecture name -> our subclass. One thin seam file per model family.
ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": (
        "sparse_plugin.models.llava:SparseLlavaForConditionalGeneration"
    ),
    "LlavaNextForConditionalGeneration": (
        "sparse_plugin.models.llava_next:SparseLlavaNextForConditionalGeneration"
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "sparse_plugin.models.qwen2_5_vl:SparseQwen2_5_VLForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": (
        "sparse_plugin.models.qwen3_vl:SparseQwen3VLForConditionalGeneration"
    ),
}

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from sparse_plugin import engine_metrics

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    engine_metrics.export()  # the first process creates the directory its children inherit
    _registered = True
    logger.info(
        "SparseVLM plugin loaded (pid %d): %s", os.getpid(), ", ".join(sorted(ARCHITECTURES))
    )
