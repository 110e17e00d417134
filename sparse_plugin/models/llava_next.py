"""LLaVA-NeXT seam: anyres images (base view + high-resolution tiles + row newlines), pruned.

Budget semantics: K is the image's whole placeholder count, i.e. everything the language model
would see for it: base-view tokens, unpadded tile tokens and ``image_newline`` tokens alike. One
global ranking over all of them picks the K (see docs/ALGORITHM.md, "LLaVA-NeXT").
"""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from sparse_plugin.models._processing import SparseProcessorMixin
from sparse_plugin.models._selection import SparseEmbedMixin
from sparse_plugin.models.llava import LlavaImageCount


class SparseLlavaNextMultiModalProcessor(
    LlavaImageCount, SparseProcessorMixin, LlavaNextMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    SparseLlavaNextMultiModalProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class SparseLlavaNextForConditionalGeneration(SparseEmbedMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT whose per-image embeddings (base + tiles + newlines) are pruned to K rows."""
