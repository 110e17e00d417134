"""An HF-transformers reference for the Qwen-VL families, outside vLLM: the model's own vision
tower and decoder on a sequence whose images are cut to chosen tokens, with the positions of
docs/ALGORITHM.md written out by hand, and (Qwen3-VL) the DeepStack features of the kept tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, BatchFeature, PreTrainedModel

# (num_visual, (h, w) token grid) -> kept indices, or None to keep the image whole
Select = Callable[[int, tuple[int, int]], torch.Tensor | None]


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

    def inputs(self, images: list[Image.Image], question: str) -> BatchFeature:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        return self.processor(images=images, text=text, return_tensors="pt")

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
        out = self.model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
        feats = out.pooler_output
        levels = getattr(out, "deepstack_features", None) if self.has_deepstack else None
        ids = x["input_ids"][0].tolist()
        rows: list[torch.Tensor] = []
        pos: list[list[int]] = []
        visual: list[bool] = []
        deep: list[list[torch.Tensor]] = [[] for _ in levels or []]
        spans: list[ImageSpan] = []
        text_ids: list[int] = []
        nxt, i, image = 0, 0, 0
        while i < len(ids):
            if ids[i] != self.config.image_token_id:
                rows.append(self.embed(torch.tensor([ids[i]])))
                pos.append([nxt] * 3)
                visual.append(False)
                text_ids.append(ids[i])
                nxt, i = nxt + 1, i + 1
                continue
            t, h, w = (int(v) for v in x["image_grid_thw"][image])
            h, w = h // self.merge, w // self.merge
            n = t * h * w
            chosen = select(n, (h, w))
            kept = torch.arange(n) if chosen is None else chosen
            spans.append(ImageSpan(len(pos), n, kept))
            rows.append(feats[image][kept])
            visual += [True] * len(kept)
            for level, per_image in zip(deep, levels or [], strict=True):
                src = kept if deepstack_rows is None else deepstack_rows(kept)
                level.append(per_image[image][src])
            if chosen is not None and compact:
                pos += [[nxt + j] * 3 for j in range(len(kept))]
                nxt += len(kept)
            elif chosen is not None:  # the rejected rule: grid positions, text at grid extent
                pos += [[nxt, int(k) // w + nxt, int(k) % w + nxt] for k in kept]
                nxt += max(h, w)
            else:
                pos += [[nxt, nxt + r, nxt + c] for r in range(h) for c in range(w)]
                nxt += max(h, w)
            i += n
            image += 1
        return RefSequence(
            embeds=torch.cat(rows),
            positions=pos,
            visual=visual,
            deepstack=[torch.cat(level) for level in deep] if levels is not None else None,
            spans=spans,
            text_ids=text_ids,
        )

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
