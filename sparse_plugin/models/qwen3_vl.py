"""Qwen3-VL seam: Qwen-VL image pruning (``_qwen.py``) plus DeepStack.

Family facts: the vision tower returns, per visual token, the LM input embedding *and* one
feature per DeepStack level, concatenated along the hidden axis ((N, d·(1 + levels)));
vLLM splits them at ``embed_input_ids`` and adds level i to the hidden states after decoder
layer i at the visual positions. Pruning selects whole rows, so the LM receives exactly the
DeepStack features of the kept tokens, in the same order, and a recycled token carries the
cluster mean of its members' DeepStack features as well. The scoring probe adds the levels after
its layers as the model does. Videos are never pruned and keep vLLM's positions (a frame per
``<|vision_start|>`` block, timestamps in the text between frames).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from sparse_plugin.models._processing import SparseProcessorMixin
from sparse_plugin.models._qwen import (
    QwenImageCount,
    QwenImageHooks,
    grid_positions,
    kept_of,
    layout,
    text_positions,
)
from sparse_plugin.models._selection import SparseEmbedMixin


class SparseQwen3VLMultiModalProcessor(
    QwenImageCount, SparseProcessorMixin, Qwen3VLMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    SparseQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class SparseQwen3VLForConditionalGeneration(
    QwenImageHooks, SparseEmbedMixin, Qwen3VLForConditionalGeneration
):
    """Qwen3-VL whose image embeddings (DeepStack levels included) are pruned to K rows."""

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        ordered = sorted(mm_features, key=lambda f: f.mm_position.offset)
        if all(kept_of(f) is None for f in ordered):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        blocks = []
        for feature in ordered:
            # vLLM's frames of this item: one for an image, one per frame for a video
            frames = list(
                self._iter_mm_grid_hw(
                    input_tokens,
                    [feature],
                    video_token_id=self.config.video_token_id,
                    vision_start_token_id=self.config.vision_start_token_id,
                    vision_end_token_id=self.config.vision_end_token_id,
                    spatial_merge_size=self.config.vision_config.spatial_merge_size,
                )
            )
            k = kept_of(feature)
            if k is not None and k < frames[0][1] * frames[0][2]:  # pruned: K compact positions
                blocks.append((feature.mm_position.offset, text_positions(k, 0)))
                continue
            for offset, h, w, _ in frames:  # as vLLM: each frame's (1, h, w) grid
                blocks.append((offset, grid_positions(1, h, w)))
        return layout(len(input_tokens), blocks)

    # -- DeepStack: the probe adds the levels after its first layers, as the model does ------
    def _lm_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_deepstack:
            return feats, None
        main, levels = feats.split([self.visual_dim, self.multiscale_dim], dim=-1)
        n = feats.shape[0]
        return main, levels.reshape(n, self.deepstack_num_level, self.visual_dim).transpose(0, 1)
