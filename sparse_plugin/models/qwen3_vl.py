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
from sparse_plugin.models._qwen import Block, QwenImageCount, QwenImageHooks, grid_positions
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

    def _unpruned_blocks(self, input_tokens: list[int], ordered: list[Any]) -> list[list[Block]]:
        # as vLLM: an image's (1, h, w) grid; a video's, frame by frame (each frame its own
        # <|vision_start|> block, timestamps as text between them)
        config = self.config
        return [
            [
                (offset, grid_positions(1, h, w))
                for offset, h, w, _ in self._iter_mm_grid_hw(
                    input_tokens,
                    [feature],
                    video_token_id=config.video_token_id,
                    vision_start_token_id=config.vision_start_token_id,
                    vision_end_token_id=config.vision_end_token_id,
                    spatial_merge_size=config.vision_config.spatial_merge_size,
                )
            ]
            for feature in ordered
        ]

    # -- DeepStack: the probe adds the levels after its first layers, as the model does ------
    def _lm_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_deepstack:
            return feats, None
        main, levels = feats.split([self.visual_dim, self.multiscale_dim], dim=-1)
        n = feats.shape[0]
        return main, levels.reshape(n, self.deepstack_num_level, self.visual_dim).transpose(0, 1)
