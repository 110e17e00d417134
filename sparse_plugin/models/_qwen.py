"""What the Qwen-VL families (2.5-VL, 3-VL) share at the seam: flat patch inputs and M-RoPE.

An image is ``<|vision_start|>``, (t·h·w)/merge² pads, ``<|vision_end|>``; its tokens carry
3-D (t, h, w) rotary positions and the text after it continues from the image's largest
position + 1. Only the pads are cut to K; the markers stay.

Positions of a pruned image (documented in docs/ALGORITHM.md): vLLM fixes every request's
M-RoPE positions when it is scheduled, before the vision tower has run, so *which* tokens
survive is not known yet; the CPU model runner also never re-reads positions after the encoder
(vLLM's EVS recompute path is GPU-runner only). So the K kept tokens get **compact** positions:
K consecutive 1-D positions (t = h = w) right after the text before them, and the text after the
image continues at +K, exactly as in LLaVA-1.5's pruned (compacted) sequence. The scoring probe,
which runs before any of this, sees the image with its true (t, h, w) positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems

from sparse_plugin.models._processing import item_budget
from sparse_plugin.models._selection import Grid

Block = tuple[int, np.ndarray]  # (prompt offset, (3, n) positions relative to the block's base)


def text_positions(length: int, start: int) -> np.ndarray:
    """(3, length): text advances one position per token on all three axes."""
    return np.broadcast_to(np.arange(length), (3, length)) + start


def grid_positions(t: int, h: int, w: int, t_scale: float = 1.0) -> np.ndarray:
    """(3, t·h·w) relative (t, h, w) positions of an unpruned item's tokens, row-major; the
    time axis advances ``t_scale`` per temporal step, truncated (Qwen2.5-VL videos, as vLLM)."""
    grid = np.indices((t, h, w))
    if t_scale != 1.0:
        grid[0] = (grid[0] * t_scale).astype(np.int64)
    return grid.reshape(3, -1)


def kept_of(feature: Any) -> int | None:
    """K for a pruned image or video (a MultiModalFeatureSpec), None when it is not pruned."""
    return item_budget(feature.data, feature.modality)


def layout(length: int, blocks: Iterable[Block]) -> tuple[torch.Tensor, int]:
    """M-RoPE positions (3, length) of a prompt whose multimodal blocks are placed as given.

    Text between blocks continues at the previous largest position + 1; each block is offset to
    where its text stops. Returns vLLM's (positions, mrope_position_delta).
    """
    pieces: list[np.ndarray] = []
    cursor = 0  # next prompt index not yet given a position
    for offset, relative in blocks:
        start = int(pieces[-1].max()) + 1 if pieces else 0
        pieces.append(text_positions(offset - cursor, start))
        pieces.append(relative + start + offset - cursor)
        cursor = offset + relative.shape[1]
    if cursor < length:
        start = int(pieces[-1].max()) + 1 if pieces else 0
        pieces.append(text_positions(length - cursor, start))
    positions = np.concatenate(pieces, axis=1).reshape(3, -1)
    return torch.from_numpy(positions), int(positions.max()) + 1 - length


class QwenImageCount:
    """Image (and video) token ids and unpruned counts for vLLM's Qwen-VL processing infos."""

    info: Any

    def _image_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_id)

    def _video_token_id(self) -> int:
        return int(self.info.get_hf_config().video_token_id)

    def _num_video_tokens(
        self, frames: int, height: int, width: int, hf_kwargs: Mapping[str, object]
    ) -> int:
        # The checkpoint's own HF processor's rule (its video processor's resize and temporal
        # patching) for the frames vLLM's loader decoded.
        processor = self.info.get_hf_processor(**hf_kwargs)
        data = processor._get_num_multimodal_tokens(
            video_sizes=[(frames, height, width)], **hf_kwargs
        )
        return int(data["num_video_tokens"][0])

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


class QwenImageHooks:
    """SparseEmbedMixin hooks for a Qwen-VL model class (put it before SparseEmbedMixin)."""

    config: Any
    is_multimodal_pruning_enabled: bool

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        if self.is_multimodal_pruning_enabled:
            # EVS appends position columns to the embeddings; SparseVLM selects and merges rows.
            raise ValueError(
                "SparseVLM image pruning cannot be combined with --video-pruning-rate (EVS); "
                "start vLLM without it, or with VLLM_PLUGINS='' to use EVS alone"
            )

    # -- M-RoPE positions of the pruned prompt -----------------------------------------------
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        ordered = sorted(mm_features, key=lambda f: f.mm_position.offset)
        if all(kept_of(f) is None for f in ordered):
            return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
        blocks: list[Block] = []
        for feature, unpruned in zip(
            ordered, self._unpruned_blocks(input_tokens, ordered), strict=True
        ):
            k = kept_of(feature)
            if k is not None and k < unpruned[0][1].shape[1]:  # pruned: K compact positions
                blocks.append((feature.mm_position.offset, text_positions(k, 0)))
            else:
                blocks += unpruned
        return layout(len(input_tokens), blocks)

    def _unpruned_blocks(self, input_tokens: list[int], ordered: list[Any]) -> list[list[Block]]:
        """Per multimodal item (in prompt order), its positions as vLLM gives them unpruned:
        one block for an image, one or more for a video (the family's own rule)."""
        raise NotImplementedError

    def _grids(self, kwargs: dict[str, object], modality: str) -> list[Grid | None]:
        grid_thw = kwargs.get(f"{modality}_grid_thw")
        if grid_thw is None:
            return []
        rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)
        merge = self.config.vision_config.spatial_merge_size
        scales = self._time_scales(kwargs, modality, len(rows))
        out: list[Grid | None] = []
        for row, scale in zip(rows, scales, strict=True):
            t, h, w = (int(v) for v in (row.tolist() if isinstance(row, torch.Tensor) else row))
            out.append(Grid(t, h // merge, w // merge, scale))
        return out

    def _time_scales(self, kwargs: dict[str, object], modality: str, count: int) -> list[float]:
        """Per item, M-RoPE time positions per temporal step (1: one per step)."""
        return [1.0] * count

    def _item_subset(
        self, kwargs: dict[str, object], idxs: list[int], modality: str = "image"
    ) -> dict[str, object]:
        """Items ``idxs`` of a batch: pixel rows and embeddings are flat (every item's patch
        rows concatenated, t·h·w each, merge² fewer for embeddings); per-item tensors
        (grids, a video's seconds per step) are batched."""
        grid_key = f"{modality}_grid_thw"
        grid_thw = kwargs[grid_key]
        assert isinstance(grid_thw, torch.Tensor)
        patches = grid_thw.prod(-1)
        out: dict[str, object] = {**kwargs, grid_key: grid_thw[idxs]}
        merge = self.config.vision_config.spatial_merge_size
        flat_names = (
            ("pixel_values_videos", "video_embeds")
            if modality == "video"
            else ("pixel_values", "image_embeds")
        )
        for name, per_item in zip(flat_names, (patches, patches // merge**2), strict=True):
            flat = kwargs.get(name)
            if isinstance(flat, torch.Tensor):
                rows = per_item.tolist()
                starts = [sum(rows[:i]) for i in range(len(rows))]
                out[name] = torch.cat([flat[starts[i] : starts[i] + rows[i]] for i in idxs])
        seconds = kwargs.get("second_per_grid_ts")
        if isinstance(seconds, torch.Tensor) and modality == "video":
            out["second_per_grid_ts"] = seconds[idxs]
        return out

    def _probe_positions(
        self, prefix: int, num_visual: int, suffix: int, grid: Grid | None, device: torch.device
    ) -> torch.Tensor:
        """The unpruned M-RoPE positions of prefix | item (t, h, w grid) | suffix, (3, L)."""
        if grid is None or grid.size != num_visual:
            raise ValueError(f"grid {grid} does not match its {num_visual} visual tokens")
        relative = grid_positions(grid.t, grid.h, grid.w, grid.t_scale)
        positions, _ = layout(prefix + num_visual + suffix, [(prefix, relative)])
        return positions.to(device)

    # GPU: the encoder CUDA-graph path skips embed_multimodal, hence the pruning.
    def get_encoder_cudagraph_config(self) -> Any:
        config = super().get_encoder_cudagraph_config()  # type: ignore[misc]
        try:
            config.modalities = []
        except (AttributeError, TypeError):  # a frozen dataclass
            config = replace(config, modalities=[])
        return config
