"""An HF-transformers reference for the Qwen-VL families, outside vLLM: the model's own vision
tower and decoder on a sequence whose images are cut to chosen tokens, with the positions of
docs/ALGORITHM.md written out by hand, and (Qwen3-VL) the DeepStack features of the kept tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, BatchFeature, PreTrainedModel

VIDEO_SAMPLE_FPS = 2.0  # Qwen2.5-VL's video frame rate (HF's processor and vLLM's loader alike)
Video = tuple[np.ndarray, float]  # (F, H, W, 3) uint8 frames as decoded, and their fps

# (num_visual, (h, w) token grid, modality) -> kept indices, or None to keep the item whole
Select = Callable[[int, tuple[int, int], str], torch.Tensor | None]


@dataclass(frozen=True)
class ImageSpan:
    offset: int  # first visual row in the sequence
    num_visual: int  # its tokens before pruning
    kept: torch.Tensor  # indices kept, in order (all of them when whole)


@dataclass(frozen=True)
class RefSequence:
    embeds: torch.Tensor  # (L, d) LM input embeddings
    positions: list[list[int]]  # (t, h, w) per row
    visual: list[bool]  # rows that carry an image token (DeepStack targets)
    deepstack: list[torch.Tensor] | None  # per level: (visual rows, d), in row order
    spans: list[ImageSpan]
    text_ids: list[int]  # the prompt's non-image token ids, in order

    def extended(self, embed: torch.Tensor) -> RefSequence:
        """One more text token after the sequence, at the next position on all three axes."""
        nxt = max(max(p) for p in self.positions) + 1
        return replace(
            self,
            embeds=torch.cat([self.embeds, embed]),
            positions=[*self.positions, [nxt] * 3],
            visual=[*self.visual, False],
        )


class QwenReference:
    def __init__(self, model_dir: Path, model_cls: type[PreTrainedModel], eager: bool = False):
        self.processor = AutoProcessor.from_pretrained(model_dir)
        kw = {"attn_implementation": "eager"} if eager else {}
        self.model = model_cls.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
        self.config = self.model.config
        self.merge = self.config.vision_config.spatial_merge_size
        self.has_deepstack = hasattr(self.config.vision_config, "deepstack_visual_indexes")

    @property
    def lm(self) -> torch.nn.Module:
        return self.model.model.language_model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(ids)

    def inputs(
        self, images: list[Image.Image], question: str, videos: list[Video] = ()
    ) -> BatchFeature:
        """The processed prompt: the images, then the videos, then the question. A video is
        all its decoded frames and their fps: HF's own video processor samples it (2 fps)."""
        content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
        content.append({"type": "text", "text": question})
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        kw: dict[str, object] = {}
        if videos:
            kw = {
                "videos": [frames for frames, _ in videos],
                "video_metadata": [
                    {"fps": fps, "total_num_frames": len(frames)} for frames, fps in videos
                ],
                "do_sample_frames": True,
                "fps": VIDEO_SAMPLE_FPS,
            }
        return self.processor(images=images or None, text=text, return_tensors="pt", **kw)

    @torch.no_grad()
    def sequence(
        self,
        x: BatchFeature,
        select: Select,
        compact: bool = True,
        deepstack_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> RefSequence:
        """The LM input for prompt ``x`` with each image cut to ``select``'s tokens.

        ``compact``: a pruned image's K tokens take K consecutive 1-D positions (the rule);
        False puts them on their grid and resumes the text at the grid's extent (the rejected
        rule). ``deepstack_rows(kept)``: which tokens' DeepStack features the kept rows get
        (default: their own).
        """
        feats, levels = self._features(x, "image")
        video_feats, _ = self._features(x, "video")
        ids = x["input_ids"][0].tolist()
        rows: list[torch.Tensor] = []
        pos: list[list[int]] = []
        visual: list[bool] = []
        deep: list[list[torch.Tensor]] = [[] for _ in levels or []]
        spans: list[ImageSpan] = []
        text_ids: list[int] = []
        nxt, i, seen = 0, 0, {"image": 0, "video": 0}
        tokens = {self.config.image_token_id: "image", self.config.video_token_id: "video"}
        while i < len(ids):
            modality = tokens.get(ids[i])
            if modality is None:
                rows.append(self.embed(torch.tensor([ids[i]])))
                pos.append([nxt] * 3)
                visual.append(False)
                text_ids.append(ids[i])
                nxt, i = nxt + 1, i + 1
                continue
            item = seen[modality]
            t, h, w = (int(v) for v in x[f"{modality}_grid_thw"][item])
            h, w = h // self.merge, w // self.merge
            n = t * h * w
            chosen = select(n, (h, w), modality)
            kept = torch.arange(n) if chosen is None else chosen
            spans.append(ImageSpan(len(pos), n, kept))
            rows.append((feats if modality == "image" else video_feats)[item][kept])
            visual += [True] * len(kept)
            for level, per_image in zip(deep, levels or [], strict=True):
                src = kept if deepstack_rows is None else deepstack_rows(kept)
                level.append(per_image[item][src])
            scale = self._time_scale(x, item) if modality == "video" else 1.0
            if chosen is not None and compact:
                pos += [[nxt + j] * 3 for j in range(len(kept))]
                nxt += len(kept)
            else:  # the grid (unpruned, or the rejected rule for a pruned item)
                grid = [[nxt + int(s * scale), nxt + r, nxt + c] for s in range(t)
                        for r in range(h) for c in range(w)]  # fmt: skip
                pos += [grid[int(k)] for k in kept]
                nxt = max(max(p) for p in grid) + 1  # text resumes after the grid's extent
            i += n
            seen[modality] += 1
        return RefSequence(
            embeds=torch.cat(rows),
            positions=pos,
            visual=visual,
            deepstack=[torch.cat(level) for level in deep] if levels is not None else None,
            spans=spans,
            text_ids=text_ids,
        )

    def _features(self, x: BatchFeature, modality: str) -> tuple[list[torch.Tensor], object]:
        """Per item of ``modality``: its merged tower features; and DeepStack levels, if any."""
        if f"{modality}_grid_thw" not in x:
            return [], None
        if modality == "image":
            out = self.model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
        else:
            out = self.model.model.get_video_features(x["pixel_values_videos"], x["video_grid_thw"])
        levels = getattr(out, "deepstack_features", None) if self.has_deepstack else None
        return out.pooler_output, levels

    def _time_scale(self, x: BatchFeature, video: int) -> float:
        """M-RoPE time positions per temporal step of a video: its seconds per step times the
        vision config's tokens per second (Qwen2.5-VL); 1 where the family has no such scale."""
        seconds = x.get("second_per_grid_ts")
        per_second = getattr(self.config.vision_config, "tokens_per_second", None)
        if seconds is None or per_second is None:
            return 1.0
        return float(seconds[video]) * per_second

    @torch.no_grad()
    def forward(self, seq: RefSequence, output_attentions: bool = False):
        """HF's decoder on ``seq`` (DeepStack added at the visual rows, as the model does)."""
        kw = {}
        if seq.deepstack is not None:
            kw = {
                "visual_pos_masks": torch.tensor(seq.visual)[None],
                "deepstack_visual_embeds": seq.deepstack,
            }
        return self.lm(
            inputs_embeds=seq.embeds[None],
            position_ids=torch.tensor(seq.positions).T[:, None, :],  # (3, 1, L)
            use_cache=False,
            output_attentions=output_attentions,
            **kw,
        )

    def logits(self, seq: RefSequence) -> torch.Tensor:
        return self.model.lm_head(self.forward(seq).last_hidden_state[0])  # (L, V)
