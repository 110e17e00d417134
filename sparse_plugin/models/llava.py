"""LLaVA-1.5 seam: vLLM's LlavaForConditionalGeneration with SparseVLM pruning during prefill.

The only LLaVA-specific facts: one ``<image>`` token per image, a fixed 24×24 = 576-token grid per
image (CLIP ViT-L/336), and vLLM's processor/info/dummy classes to extend.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import BaseMultiModalProcessor

from sparse_plugin.models._processing import SparseProcessorMixin
from sparse_plugin.models._selection import SparseEmbedMixin


class LlavaImageCount:
    """Image token id and unpruned count for vLLM's LLaVA-style processing infos (1.5, NeXT)."""

    info: LlavaProcessingInfo

    def _image_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_index)

    def _num_image_tokens(
        self, mm_items: MultiModalDataItems, item_idx: int, hf_kwargs: Mapping[str, object]
    ) -> int:
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        return int(self.info.get_num_image_tokens(image_width=size.width, image_height=size.height))


class SparseLlavaMultiModalProcessor(
    LlavaImageCount, SparseProcessorMixin, LlavaMultiModalProcessor
):
    pass


def _build_processor(info: LlavaProcessingInfo, dummy_inputs: LlavaDummyInputsBuilder):
    if not isinstance(info, LlavaProcessingInfo):  # Pixtral-HF checkpoints: not supported yet
        from vllm.model_executor.models.llava import _build_llava_or_pixtral_hf_processor

        return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)
    processor: BaseMultiModalProcessor = SparseLlavaMultiModalProcessor(info, dummy_inputs)
    return processor


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder
)
class SparseLlavaForConditionalGeneration(SparseEmbedMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 whose image embeddings are pruned to each request's budget."""
