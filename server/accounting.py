"""Visual-token and FLOP accounting from the served checkpoint's config.json (and processor).

``kept`` always comes from what vLLM reports it processed (``prompt_tokens_details``);
``original`` is what the same images take unpruned, from the model's geometry: a fixed count for
LLaVA-1.5, the checkpoint's own HF processor's count per image size for LLaVA-NeXT, Qwen2.5-VL
and Qwen3-VL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Size = tuple[int, int]  # (width, height)
# Model types whose image token count depends on the image size (counted by their HF processor).
SIZE_DEPENDENT = {"llava_next", "qwen2_5_vl", "qwen3_vl"}


def processor_counter(model_dir: Path) -> Callable[[Sequence[Size]], list[int]]:
    """Unpruned image-token counts per (width, height), from the checkpoint's own processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)

    def count(sizes: Sequence[Size]) -> list[int]:
        data = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
        return [int(n) for n in data["num_image_tokens"]]

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
        return cls(
            tokens_per_image=tokens,
            layers=int(text["num_hidden_layers"]),
            hidden=int(text["hidden_size"]),
            intermediate=int(text["intermediate_size"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            count_by_size=(
                processor_counter(model_dir) if config.get("model_type") in SIZE_DEPENDENT else None
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


def kept_visual_tokens(usage: dict[str, Any]) -> int | None:
    details = usage.get("prompt_tokens_details") or {}
    mm = details.get("multimodal_tokens") or {}
    return int(mm["image"]) if "image" in mm else None


def visual_usage(
    geometry: ModelGeometry | None, sizes: Sequence[Size | None], usage: dict[str, Any]
) -> dict[str, int] | None:
    kept = kept_visual_tokens(usage)
    original = geometry.original_tokens(sizes) if geometry is not None else None
    if kept is None or original is None:
        return None
    return {"original": original, "kept": kept, "saved": original - kept}
