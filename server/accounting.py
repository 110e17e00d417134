"""Visual-token and FLOP accounting from the served checkpoint's config.json (and processor).

``kept`` always comes from what vLLM reports it processed (``prompt_tokens_details``, per
modality); ``original`` is what the same images and videos take unpruned, from the model's
geometry: a fixed count for LLaVA-1.5, the checkpoint's own HF processor's count per image size
for LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL, and for videos (Qwen2.5-VL, Qwen3-VL) that processor's
count for the frames vLLM's own video loader samples from the clip.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("sparsevlm.gateway")

Size = tuple[int, int]  # (width, height)
# Model types whose image token count depends on the image size (counted by their HF processor).
SIZE_DEPENDENT = {"llava_next", "qwen2_5_vl", "qwen3_vl"}
# Model types that take videos (and whose videos the plugin prunes).
VIDEO_MODELS = {"qwen2_5_vl", "qwen3_vl"}
VideoCounter = Callable[[Any], int]  # an open cv2.VideoCapture -> unpruned video tokens


def processor_counter(processor: Any) -> Callable[[Sequence[Size]], list[int]]:
    """Unpruned image-token counts per (width, height), from the checkpoint's own processor."""

    def count(sizes: Sequence[Size]) -> list[int]:
        data = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
        return [int(n) for n in data["num_image_tokens"]]

    return count


def video_counter(model_dir: Path, processor: Any) -> VideoCounter | None:
    """Unpruned video tokens of a clip (an open ``cv2.VideoCapture``) exactly as vLLM counts them.

    vLLM 0.32 decodes a ``video_url`` with the loader registered for the checkpoint's video
    processor (Qwen2-VL/2.5-VL: ``qwen2_vl``, 2 frames per second, a multiple of the temporal
    patch; Qwen3-VL: ``qwen3_vl``), at its default arguments, from the container's metadata as
    its OpenCV reader sees it; the HF processor then counts those frames. The same vLLM
    functions are called here, so the count follows the pinned vLLM. None without vLLM
    installed (then a video's ``original`` is unknown and usage carries no visual_tokens).
    Assumes the engine runs without ``--media-io-kwargs`` for video (that changes the sampling).
    """
    try:
        import cv2
        from vllm import envs
        from vllm.multimodal.media.video import VideoMediaIO
        from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
        from vllm.multimodal.video_decoders import VideoTargetMetadata
        from vllm.multimodal.video_decoders.opencv import OpenCVVideoBackendMixin as OpenCV
        from vllm.transformers_utils.processor import get_video_processor_cls_name_from_config
    except ImportError:
        logger.warning("vLLM is not importable: videos' unpruned token counts are unknown")
        return None
    name = get_video_processor_cls_name_from_config(str(model_dir))
    backend = VIDEO_LOADER_REGISTRY.get_backend_for_video_processor(name)
    loader = VIDEO_LOADER_REGISTRY.load(backend or envs.VLLM_VIDEO_LOADER_BACKEND)
    # What VideoMediaIO.load_bytes passes: its num_frames, and the loader's own defaults.
    defaults = inspect.signature(loader.load_bytes).parameters
    target = VideoTargetMetadata(
        num_frames=inspect.signature(VideoMediaIO).parameters["num_frames"].default,
        fps=defaults["fps"].default,
        max_duration=defaults["max_duration"].default,
    )

    def count(cap: Any) -> int:
        source = loader._prepare_source(OpenCV.get_video_metadata(cap))  # rewinds to frame 0
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        # vLLM reads each distinct index once (OpenCVVideoBackendMixin.read_frames).
        frames = len(set(loader.compute_frames_index_to_sample(source=source, target=target)))
        data = processor._get_num_multimodal_tokens(video_sizes=[(frames, height, width)])
        return int(data["num_video_tokens"][0])

    return count


@dataclass(frozen=True)
class ModelGeometry:
    tokens_per_image: int | None  # fixed-resolution models (LLaVA-1.5); None if size-dependent
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    count_by_size: Callable[[Sequence[Size]], list[int]] | None = field(
        default=None, compare=False, repr=False
    )
    count_video: VideoCounter | None = field(default=None, compare=False, repr=False)

    def original_tokens(self, sizes: Sequence[Size | None]) -> int | None:
        """Unpruned visual tokens of images of these sizes (None where it cannot be known)."""
        if self.tokens_per_image is not None:
            return self.tokens_per_image * len(sizes)
        if self.count_by_size is None or any(s is None for s in sizes):
            return None
        return sum(self.count_by_size([s for s in sizes if s is not None]))

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelGeometry:
        config = json.loads((model_dir / "config.json").read_text())
        text = config.get("text_config", config)
        vision = config.get("vision_config", {})
        tokens = None
        if config.get("model_type") == "llava" and vision.get("image_size"):
            tokens = (vision["image_size"] // vision["patch_size"]) ** 2
            if config.get("vision_feature_select_strategy") == "full":
                tokens += 1
        heads = int(text["num_attention_heads"])
        model_type = config.get("model_type")
        processor = None
        if model_type in SIZE_DEPENDENT:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(model_dir)
        return cls(
            tokens_per_image=tokens,
            layers=int(text["num_hidden_layers"]),
            hidden=int(text["hidden_size"]),
            intermediate=int(text["intermediate_size"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            count_by_size=processor_counter(processor) if processor is not None else None,
            count_video=(
                video_counter(model_dir, processor) if model_type in VIDEO_MODELS else None
            ),
        )

    def prefill_flops_per_token(self, context: int) -> float:
        """Forward FLOPs one prompt token costs the language model (2 per multiply-add).

        Per layer: Q and O projections 2·d², K and V 2·d·d_kv, gated MLP 3·d·d_ff, and
        attention scores + values against ``context`` tokens 2·d·context.
        """
        d, d_kv = self.hidden, self.hidden * self.kv_heads // self.heads
        per_layer = 2 * d * d + 2 * d * d_kv + 3 * d * self.intermediate + 2 * d * context
        return 2.0 * self.layers * per_layer

    def flops_saved(self, saved_tokens: int, prompt_tokens: int) -> float:
        return saved_tokens * self.prefill_flops_per_token(prompt_tokens + saved_tokens)


def visual_usage_by_modality(
    geometry: ModelGeometry | None,
    sizes: Sequence[Size | None],
    usage: dict[str, Any],
    videos: Sequence[int | None] = (),
) -> dict[str, dict[str, int]] | None:
    """{modality: {original, kept, saved}} for the request's images (``sizes``) and videos (their
    unpruned token counts); None where any count is unknown. ``kept`` is what vLLM reports."""
    mm = (usage.get("prompt_tokens_details") or {}).get("multimodal_tokens") or {}
    originals: dict[str, int | None] = {}
    if sizes:
        originals["image"] = geometry.original_tokens(sizes) if geometry is not None else None
    if videos:
        known = [n for n in videos if n is not None]
        originals["video"] = sum(known) if len(known) == len(videos) else None
    out = {}
    for modality, original in originals.items():
        if original is None or modality not in mm:
            return None
        kept = int(mm[modality])
        out[modality] = {"original": original, "kept": kept, "saved": original - kept}
    return out or None


def visual_totals(by_modality: dict[str, dict[str, int]]) -> dict[str, int]:
    return {k: sum(m[k] for m in by_modality.values()) for k in ("original", "kept", "saved")}
