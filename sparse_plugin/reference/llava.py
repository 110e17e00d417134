"""SparseVLM as published: progressive in-decoder pruning for an HF-transformers LLaVA-1.5.

For validation and comparison only (batch size 1, one image), not for serving. It runs the
language model layer by layer: after each pruning layer (2, 6, 15 for 32 layers) the visual
tokens are re-scored with that layer's own rater attention, the stage's list value is kept,
deleted tokens are recycled (v1.5) and the shorter sequence continues at the next layer. Every
layer caches only the tokens it saw, so KV lengths differ per layer group; during decoding each
layer group uses its own cache length as the position (v1.x) or the original length + t (v2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sparse_plugin import core

logger = logging.getLogger("sparse_plugin.reference")


def llama_qk(layer, hidden: Tensor, pos_emb) -> tuple[Tensor, Tensor]:
    """Queries and keys after RoPE of an HF Llama decoder layer whose input is ``hidden`` (B, L, d):
    (B, H, L, dh) and (B, Hkv, L, dh)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, *pos_emb)


def visual_features(model: LlavaForConditionalGeneration, pixel_values: Tensor) -> Tensor:
    """(images x visual tokens, d) projected patch features, whichever container (tensor, list
    per image, output object) this transformers version's ``get_image_features`` returns."""
    feats = model.model.get_image_features(pixel_values=pixel_values)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


def prompt_embeds(
    model: LlavaForConditionalGeneration, input_ids: Tensor, pixel_values: Tensor
) -> tuple[Tensor, int, int]:
    """The language model's input for a one-image prompt: (L, d) embeddings with the image's
    features in place of its placeholder tokens, the image's first position and token count."""
    ids = input_ids[0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    vs, n = int(image[0]), int(image.numel())
    embeds = model.model.language_model.embed_tokens(ids).clone()
    embeds[vs : vs + n] = visual_features(model, pixel_values).to(embeds.dtype)
    return embeds, vs, n


def scaled_prune_layers(num_layers: int, base: tuple[int, ...] = core.PRUNE_LAYERS) -> tuple:
    """The paper's layers (for 32 layers) mapped proportionally onto a shallower/deeper LM."""
    if num_layers == 32:
        return base
    return tuple(sorted({min(num_layers - 1, max(0, round(x * num_layers / 32))) for x in base}))


@dataclass
class ReferenceResult:
    tokens: list[int]
    visual_counts: list[int] = field(default_factory=list)  # after each pruning layer


class ReferenceSparseVLM:
    """``ReferenceSparseVLM(model, setting=192).generate(input_ids, pixel_values)``."""

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        setting: int = 192,
        version: str = "v1.5",
        recycle: bool | None = None,
        prune_layers: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model.eval()
        self.lm = model.model.language_model
        self.config = model.config.text_config
        self.version = version
        self.lists = core.STAGE_LISTS[version][setting]
        self.recycle = (version == "v1.5") if recycle is None else recycle
        self.prune_layers = prune_layers or scaled_prune_layers(self.config.num_hidden_layers)
        assert len(self.prune_layers) == len(self.lists), "one list value per pruning layer"

    # -- prefill -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, pixel_values: Tensor, max_new_tokens: int = 8
    ) -> ReferenceResult:
        embeds, vs, n = prompt_embeds(self.model, input_ids, pixel_values)
        raters = core.select_raters(embeds[vs : vs + n], embeds[vs + n :]) + vs + n  # absolute

        hidden = embeds[None]  # (1, L, d)
        positions = torch.arange(hidden.shape[1])
        cache = DynamicCache(config=self.config)
        counts: list[int] = []
        stage = 0
        for i, layer in enumerate(self.lm.layers):
            pos_emb = self.lm.rotary_emb(hidden, positions[None])
            if i in self.prune_layers:
                q, k = self._qk(layer, hidden, pos_emb)
            hidden = layer(
                hidden, position_ids=positions[None], past_key_values=cache, use_cache=True,
                position_embeddings=pos_emb,
            )  # fmt: skip
            if i in self.prune_layers:
                hidden, positions, raters, n = self._prune(
                    hidden, positions, raters, vs, n, q, k, self.lists[stage]
                )
                counts.append(n)
                stage += 1
        logger.info("reference %s/%s visual tokens after layers %s: %s",
                    self.version, self.lists, self.prune_layers, counts)  # fmt: skip
        tokens = [int(self.model.lm_head(self.lm.norm(hidden[:, -1])).argmax(-1))]
        original_len = input_ids.shape[1]
        eos = self._eos_ids()
        for t in range(max_new_tokens - 1):
            if tokens[-1] in eos:  # as HF greedy decoding: the answer ends at EOS
                break
            tokens.append(self._decode_step(tokens[-1], cache, original_len + t))
        return ReferenceResult(tokens, counts)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def _qk(self, layer, hidden: Tensor, pos_emb) -> tuple[Tensor, Tensor]:
        q, k = llama_qk(layer, hidden, pos_emb)
        return q[0], k[0]  # (H, L, dh), (Hkv, L, dh)

    def _prune(self, hidden, positions, raters, vs, n, q, k, listed):
        visual = slice(vs, vs + n)
        probs = core.rater_attention(q[:, raters], k, raters, visual, scale=q.shape[-1] ** -0.5)
        if self.version == "v2":
            theta = float(self.config.rope_parameters.get("rope_theta", 10000.0))
            gravity = core.rope_gravity(positions[raters], positions[visual], q.shape[-1], theta)
            heads = max(1, round(14 / 32 * q.shape[0]))
            scores = core.score_v2(probs, gravity, heads=heads)
        else:
            scores = core.score_v15(probs)
        keep = core.stage_keep(listed, n)
        kept = core.top_k_sorted(scores, keep)
        merged = hidden[0, :0]
        if self.recycle:
            deleted = torch.ones(n, dtype=torch.bool)
            deleted[kept] = False
            clusters = core.recycle_clusters(n - keep)
            merged = core.recycle_tokens(
                hidden[0, visual], scores, deleted.nonzero().flatten(), clusters
            )
        new_visual = torch.cat([hidden[0, visual][kept], merged])
        new_hidden = torch.cat([hidden[0, :vs], new_visual, hidden[0, vs + n :]])[None]
        new_n = new_visual.shape[0]
        shift = n - new_n
        if self.version == "v2":  # kept tokens keep their original positions (gaps)
            vis_pos = positions[visual][kept]
            if len(merged):
                vis_pos = torch.cat([vis_pos, vis_pos[-1:].repeat(len(merged))])
            positions = torch.cat([positions[:vs], vis_pos, positions[vs + n :]])
        else:  # compacted
            positions = torch.arange(new_hidden.shape[1])
        return new_hidden, positions, raters - shift, new_n

    # -- decode ------------------------------------------------------------------------------
    def _decode_step(self, token: int, cache: DynamicCache, v2_position: int) -> int:
        hidden = self.lm.embed_tokens(torch.tensor([[token]]))
        for i, layer in enumerate(self.lm.layers):
            pos = v2_position if self.version == "v2" else cache.get_seq_length(i)
            position = torch.tensor([[pos]])
            pos_emb = self.lm.rotary_emb(hidden, position)
            hidden = layer(
                hidden, position_ids=position, past_key_values=cache, use_cache=True,
                position_embeddings=pos_emb,
            )  # fmt: skip
        return int(self.model.lm_head(self.lm.norm(hidden[:, -1])).argmax(-1))
