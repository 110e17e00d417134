"""Qwen2.5-VL seam: dynamic-resolution images with M-RoPE positions, pruned.

The Qwen-VL facts shared with Qwen3-VL (placeholders, compact positions of a pruned image, flat
patch inputs) live in ``_qwen.py``. Qwen2.5-VL's own: videos are pruned too (a video is one
block of t·h·w/merge² pads, ranked as a whole), and the (t, h, w) grid of a video scales t to
seconds (``t_factor``: second_per_grid_ts × tokens_per_second), in the probe as in vLLM.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from sparse_plugin.models._processing import SparseProcessorMixin
from sparse_plugin.models._qwen import Block, QwenImageCount, QwenImageHooks, grid_positions
from sparse_plugin.models._selection import SparseEmbedMixin


class SparseQwen2_5_VLMultiModalProcessor(
    QwenImageCount, SparseProcessorMixin, Qwen2_5_VLMultiModalProcessor
):
    def _pruned_modalities(self) -> tuple[str, ...]:
        return ("image", "video")

    def _num_layers(self) -> int:
        config = self.info.get_hf_config()
        return int(getattr(config, "text_config", config).num_hidden_layers)


@MULTIMODAL_REGISTRY.register_processor(
    SparseQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class SparseQwen2_5_VLForConditionalGeneration(
    QwenImageHooks, SparseEmbedMixin, Qwen2_5_VLForConditionalGeneration
):
    """Qwen2.5-VL whose image embeddings are pruned to K rows, with positions to match."""

    def _unpruned_blocks(self, input_tokens: list[int], ordered: list[Any]) -> list[list[Block]]:
        # as vLLM: t scaled to seconds for videos
        return [
            [(offset, grid_positions(t, h, w, t_factor))]
            for offset, t, h, w, t_factor in self.iter_mm_grid_thw(ordered)
        ]

    def _time_scales(self, kwargs: dict[str, object], modality: str, count: int) -> list[float]:
        seconds = kwargs.get("second_per_grid_ts")
        if modality != "video" or seconds is None:
            return [1.0] * count
        per_second = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        values = seconds.tolist() if isinstance(seconds, torch.Tensor) else list(seconds)
        return [float(v) * per_second for v in values]
