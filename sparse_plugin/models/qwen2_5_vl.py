"""Qwen2.5-VL seam: dynamic-resolution images with M-RoPE positions, pruned.

Family facts: an image is ``<|vision_start|>``, (t·h·w)/merge² pads, ``<|vision_end|>``;
its tokens carry 3-D (t, h, w) rotary positions; the text after an image continues from the
image's largest position + 1. Only the pads are cut to K; the markers stay.

Positions of a pruned image (decided here, documented in docs/ALGORITHM.md): vLLM fixes every
request's M-RoPE positions when it is scheduled, before the vision tower has run, so *which*
tokens survive is not known yet; the CPU model runner also never re-reads positions after the
encoder (vLLM's EVS recompute path is GPU-runner only). So the K kept tokens get **compact**
positions: K consecutive 1-D positions (t = h = w) right after the text before them, and the text
after the image continues at +K, exactly as in LLaVA-1.5's pruned (compacted) sequence. The
scoring probe, which runs before any of this, sees the image with its true (t, h, w) positions.
Videos are never pruned (the knob applies to images) and keep vLLM's positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems

from sparse_plugin.models._processing import SparseProcessorMixin, item_budget
from sparse_plugin.models._selection import Grid, SparseEmbedMixin


class SparseQwen2_5_VLMultiModalProcessor(SparseProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    def _image_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_id)

    def _num_layers(self) -> int:
        config = self.info.get_hf_config()
        return int(getattr(config, "text_config", config).num_hidden_layers)

    def _num_image_tokens(
        self, mm_items: MultiModalDataItems, item_idx: int, hf_kwargs: Mapping[str, object]
    ) -> int:
        # Same resize rule as the HF processor, with this request's min/max pixels if it set any.
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        return int(
            self.info.get_num_image_tokens(
                image_width=size.width,
                image_height=size.height,
                image_processor=self.info.get_image_processor(**hf_kwargs),
                mm_kwargs=hf_kwargs,
            )
        )


def _text_positions(length: int, start: int) -> np.ndarray:
    return np.broadcast_to(np.arange(length), (3, length)) + start


def kept_of(feature: Any) -> int | None:
    """K for a pruned image feature (a MultiModalFeatureSpec), None when it is not pruned."""
    return item_budget(feature.data) if feature.modality == "image" else None


@MULTIMODAL_REGISTRY.register_processor(
    SparseQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class SparseQwen2_5_VLForConditionalGeneration(
    SparseEmbedMixin, Qwen2_5_VLForConditionalGeneration
):
    """Qwen2.5-VL whose image embeddings are pruned to K rows, with positions to match."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            # EVS appends position columns to the embeddings; SparseVLM selects and merges rows.
            raise ValueError(
                "SparseVLM image pruning cannot be combined with --video-pruning-rate (EVS); "
                "start vLLM without it, or with VLLM_PLUGINS='' to use EVS alone"
            )

    # -- M-RoPE positions of the pruned prompt ---------------------------------------------
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        ordered = sorted(mm_features, key=lambda f: f.mm_position.offset)
        kept = [kept_of(f) for f in ordered]
        if all(k is None for k in kept):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces: list[np.ndarray] = []
        cursor = 0  # next prompt index not yet given a position
        for k, (offset, t, h, w, t_factor) in zip(
            kept, self.iter_mm_grid_thw(mm_features), strict=True
        ):
            start = int(pieces[-1].max()) + 1 if pieces else 0
            pieces.append(_text_positions(offset - cursor, start))
            base = start + offset - cursor
            if k is not None and k < t * h * w:  # pruned: K compact positions
                pieces.append(_text_positions(k, base))
                cursor = offset + k
            else:  # as vLLM: the (t, h, w) grid, t scaled to seconds for videos
                grid = np.indices((t, h, w))
                if t_factor != 1.0:
                    grid[0] = (grid[0] * t_factor).astype(np.int64)
                pieces.append(grid.reshape(3, -1) + base)
                cursor = offset + t * h * w
        if cursor < len(input_tokens):
            start = int(pieces[-1].max()) + 1 if pieces else 0
            pieces.append(_text_positions(len(input_tokens) - cursor, start))
        positions = np.concatenate(pieces, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)

    # -- scoring probe ---------------------------------------------------------------------
    def _image_grids(self, kwargs: dict[str, object]) -> list[Grid | None]:
        grid_thw = kwargs.get("image_grid_thw")
        if grid_thw is None:
            return []
        rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)
        merge = self.config.vision_config.spatial_merge_size
        out: list[Grid | None] = []
        for row in rows:
            t, h, w = (int(v) for v in (row.tolist() if isinstance(row, torch.Tensor) else row))
            out.append((t, h // merge, w // merge))
        return out

    def _item_subset(self, kwargs: dict[str, object], idxs: list[int]) -> dict[str, object]:
        """Images ``idxs`` of a batch: ``pixel_values`` / ``image_embeds`` are flat (every
        image's patch rows concatenated, t·h·w each, merge² fewer for embeddings)."""
        grid_thw = kwargs["image_grid_thw"]
        assert isinstance(grid_thw, torch.Tensor)
        patches = grid_thw.prod(-1)
        out: dict[str, object] = {**kwargs, "image_grid_thw": grid_thw[idxs]}
        merge = self.config.vision_config.spatial_merge_size
        for name, per_image in (("pixel_values", patches), ("image_embeds", patches // merge**2)):
            flat = kwargs.get(name)
            if isinstance(flat, torch.Tensor):
                rows = per_image.tolist()
                starts = [sum(rows[:i]) for i in range(len(rows))]
                out[name] = torch.cat([flat[starts[i] : starts[i] + rows[i]] for i in idxs])
        return out

    def _probe_positions(
        self, prefix: int, num_visual: int, suffix: int, grid: Grid | None, device: torch.device
    ) -> torch.Tensor:
        """The unpruned M-RoPE positions of prefix | image (t, h, w grid) | suffix, (3, L)."""
        if grid is None or grid[0] * grid[1] * grid[2] != num_visual:
            raise ValueError(f"image grid {grid} does not match its {num_visual} visual tokens")
        image = np.indices(grid).reshape(3, -1) + prefix
        after = int(image.max()) + 1
        positions = np.concatenate(
            [_text_positions(prefix, 0), image, _text_positions(suffix, after)], axis=1
        )
        return torch.from_numpy(np.ascontiguousarray(positions)).to(device)

    # -- GPU: the encoder CUDA-graph path skips embed_multimodal, hence the pruning ---------
    def get_encoder_cudagraph_config(self) -> Any:
        config = super().get_encoder_cudagraph_config()
        try:
            config.modalities = []
        except (AttributeError, TypeError):  # a frozen dataclass
            from dataclasses import replace

            config = replace(config, modalities=[])
        return config
