"""LLaVA-1.5 seam: vLLM's LlavaForConditionalGeneration with SparseVLM pruning during prefill.

The only LLaVA-specific facts: one ``<image>`` token per image, a fixed 24×24 = 576-token grid per
image (CLIP ViT-L/336), and vLLM's processor/info/dummy classes to extend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import BaseMultiModalProcessor, PromptReplacement, PromptUpdate

from sparse_plugin.models._processing import SparseProcessorMixin
from sparse_plugin.models._selection import SparseEmbedMixin


class SparseLlavaMultiModalProcessor(SparseProcessorMixin, LlavaMultiModalProcessor):
    def _image_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_index)

    def _num_image_tokens(self, mm_items: MultiModalDataItems, item_idx: int) -> int:
        images = mm_items.get_items("image", ImageProcessorItems)
        size = images.get_image_size(item_idx)
        return int(self.info.get_num_image_tokens(image_width=size.width, image_height=size.height))

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        n_images = mm_items.get_all_counts().get("image", 0)
        if not any(self.kept_count(out_mm_kwargs, i) is not None for i in range(n_images)):
            return updates
        image_token_id = self._image_token_id()
        unpruned = updates[0].replacement

        def replacement(item_idx: int) -> list[int]:
            kept = self.kept_count(out_mm_kwargs, item_idx)
            if kept is None:
                return unpruned(item_idx)  # type: ignore[operator]
            return [image_token_id] * kept

        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)
        ]


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
