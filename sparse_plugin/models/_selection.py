"""Model-executor side of the seam: fill each item's K placeholder slots with the chosen tokens.

Runs inside ``embed_multimodal`` (the encoder step of prefill). For each pruned image or video it
takes the vision tower's features (from the content-keyed vision cache when the item is known),
builds that item's own sequence (context before, its features, the rater text after), lets
SparseVLM's raters judge the visual tokens with the attention of the scoring layer, and returns
exactly K rows: the kept tokens in original order followed by the recycled cluster means. A video
is ranked as a whole (not frame by frame), optionally after its repeats are set aside
(``core/temporal.py``).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import torch

from sparse_plugin import core
from sparse_plugin.engine_metrics import ProcessCounters
from sparse_plugin.models._probe import (
    probe_layer,
    rope_gravity,
    tp_gather_heads,
    tp_rank,
    tp_sum,
    tp_world_size,
)
from sparse_plugin.models._processing import COVERAGE_SCALE, METHOD_IDS, VERSION_IDS, fields
from sparse_plugin.models._vision_cache import VisionCache, capacity_from_env

_METHODS = {v: k for k, v in METHOD_IDS.items()}
_VERSIONS = {v: k for k, v in VERSION_IDS.items()}
TRACE_ENV = "SPARSEVLM_TRACE"
"""If set, a file path: the model executor appends each pruned image's selection to it."""
V2_PRIORITY_HEADS_FRACTION = 14 / 32  # the reference keeps 14 of LLaVA-1.5-7B's 32 heads


def _item(batch: Any, i: int) -> torch.Tensor:
    """Item ``i`` of a batched field (a stacked tensor or a list of ragged tensors)."""
    return batch[i]


class Grid(NamedTuple):
    """(t, h, w) of an image's or video's visual tokens as the LM sees them."""

    t: int
    h: int
    w: int
    t_scale: float = 1.0  # M-RoPE time positions per temporal step (Qwen2.5-VL videos: seconds)

    @property
    def size(self) -> int:
        return self.t * self.h * self.w


MODALITIES = ("image", "video")


class SparseEmbedMixin:
    """Mixin for a vLLM multimodal model class whose ``embed_multimodal`` returns per-image
    (N, d) features in the LM's embedding space. Family hooks: ``_grids``,
    ``_probe_positions`` (M-RoPE models override both) and ``_item_subset``."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self._vision_cache = VisionCache(capacity_from_env())
        name = vllm_config.model_config.served_model_name
        self._served_name = name[0] if isinstance(name, list) else str(name)
        self._counters: ProcessCounters | None = None

    def load_weights(self, weights: Any) -> Any:
        self._vision_cache.clear()  # features of the old weights must not outlive a reload
        return super().load_weights(weights)  # type: ignore[misc]

    def embed_multimodal(self, **kwargs: object) -> Any:
        # vLLM encodes one modality per call; a pruned batch carries that modality's fields.
        modality = next((m for m in MODALITIES if fields(m)[0] in kwargs), None)
        if modality is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        params, prefixes, suffixes, keys = (kwargs.pop(name) for name in fields(modality))
        grids = self._grids(kwargs, modality)
        names = [bytes(_item(keys, i).tolist()).hex() for i in range(len(params))]
        features, hits = self._vision_features(kwargs, names, modality)
        return [
            self._prune_item(
                feats,
                _item(params, i),
                _item(prefixes, i),
                _item(suffixes, i),
                grids[i] if i < len(grids) else None,
                modality=modality,
                image=names[i],
                vision="hit" if hits[i] else "miss",
            )
            for i, feats in enumerate(features)
        ]

    # -- vision tower, through the content-keyed cache --------------------------------------
    def _vision_features(
        self, kwargs: dict[str, object], names: list[str], modality: str = "image"
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """Per item: its projected features, and whether they came from the vision cache.

        The tower runs once per distinct item that is not cached, in one batch.
        """
        found = {n: f for n in set(names) if (f := self._vision_cache.get(n)) is not None}
        cached = [n in found for n in names]
        todo = list(dict.fromkeys(n for n in names if n not in found))  # distinct, in order
        if todo:
            first = [names.index(n) for n in todo]
            batch = (
                kwargs if len(first) == len(names) else self._item_subset(kwargs, first, modality)
            )
            outputs = super().embed_multimodal(**batch)  # type: ignore[misc]
            for name, feats in zip(todo, outputs, strict=True):
                found[name] = feats
                self._vision_cache.put(name, feats)
        self._count("sparsevlm_engine_vision_cache_hits", len(names) - len(todo))
        self._count("sparsevlm_engine_vision_cache_misses", len(todo))
        device = next(iter(found.values())).device if todo else self._feature_device()
        return [found[n].to(device) for n in names], cached

    def _feature_device(self) -> torch.device:
        return next(self.get_language_model().parameters()).device  # type: ignore[attr-defined]

    def _count(self, name: str, amount: int) -> None:
        if amount and tp_rank() == 0:  # every rank encodes alike; count the images once
            if self._counters is None:
                self._counters = ProcessCounters()
            self._counters.inc(name, self._served_name, amount)

    # -- family hooks ------------------------------------------------------------------------
    def _grids(self, kwargs: dict[str, object], modality: str) -> list[Grid | None]:
        """Per item of this batch: its (t, h, w) token grid, where the family knows one."""
        return []

    def _lm_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split an image's (N, ·) encoder output into the (N, d) embeddings the LM's input
        receives and the (levels, N, d) features added after its first decoder layers, one
        level per layer (Qwen3-VL's DeepStack), or None where the family has none."""
        return feats, None

    def _visual_grid(self, num_visual: int, grid: Grid | None) -> tuple[int, int] | None:
        """The item's 2-D token grid: the family's own (None for a multi-frame video, which has
        no single 2-D layout), else a square one when N is a square (LLaVA-1.5's 24 x 24)."""
        if grid is not None and grid.size == num_visual:
            return (grid.h, grid.w) if grid.t == 1 else None
        side = int(round(num_visual**0.5))
        return (side, side) if side * side == num_visual else None

    def _probe_positions(
        self, prefix: int, num_visual: int, suffix: int, grid: Grid | None, device: torch.device
    ) -> torch.Tensor:
        """Positions of the probe sequence (prefix | image | suffix), as the LM would see it."""
        return torch.arange(prefix + num_visual + suffix, device=device)

    def _item_subset(
        self, kwargs: dict[str, object], idxs: list[int], modality: str = "image"
    ) -> dict[str, object]:
        """The vision-tower inputs of items ``idxs`` only, from a batch of them.

        Default: every input is batched along its first dimension (a tensor or a list with one
        entry per image), as for LLaVA-1.5 and LLaVA-NeXT; flat inputs need a family override.
        """
        out: dict[str, object] = {}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                out[name] = value[idxs]
            elif isinstance(value, list | tuple):
                out[name] = [value[i] for i in idxs]
            else:
                out[name] = value
        return out

    # -- selection ---------------------------------------------------------------------------
    def _prune_item(
        self,
        feats: torch.Tensor,
        params: torch.Tensor,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        grid: Grid | None = None,
        modality: str = "image",
        **trace: str,
    ) -> torch.Tensor:
        method_id, budget, recycle, version_id, score_layer, coverage, temporal = (
            int(x) for x in params.tolist()
        )
        method = _METHODS[method_id]
        n = feats.shape[0]
        if budget >= n:
            return feats
        frames = (grid.t, grid.h, grid.w) if grid is not None and grid.size == n else None
        if method == "temporal" and (frames is None or frames[0] == 1):
            method = "uniform"  # one frame: nothing repeats, so spread evenly
        recycled = feats[:0]
        novel = None  # tokens the temporal stage left as candidates (traced), when it ran
        if method == "random":
            kept = core.random_indices(n, budget)
        elif method == "uniform":
            kept = core.uniform_indices(n, budget, self._visual_grid(n, grid))
        elif method == "temporal":
            assert frames is not None
            kept = core.temporal_indices(self._lm_features(feats)[0], frames, budget)
        else:
            embeds, deepstack = self._lm_features(feats)
            scores = self._attention_scores(
                embeds,
                prefix,
                suffix,
                score_layer,
                grid,
                fastv=method == "fastv",
                version=_VERSIONS[version_id],
                deepstack=deepstack,
            )
            candidates = None
            if temporal and frames is not None and frames[0] > 1:
                candidates = core.novel_candidates(embeds, frames, temporal / COVERAGE_SCALE)
                novel = int(candidates.sum())
            # whole rows: a recycled token merges its members' DeepStack features alike
            selection = core.select_visual_tokens(
                feats,
                scores,
                budget,
                recycle=bool(recycle),
                coverage=coverage / COVERAGE_SCALE or None,
                features=embeds,
                grid=self._visual_grid(n, grid),
                candidates=candidates,
            )
            kept, recycled = selection.kept, selection.recycled
        kept = kept.to(feats.device)
        _trace(
            method=method,
            modality=modality,
            num_visual=n,
            budget=budget,
            kept=kept,
            recycled=len(recycled),
            context=[len(prefix), len(suffix)],
            **({} if novel is None else {"novel": novel}),
            **trace,
        )
        return torch.cat([feats[kept], recycled], dim=0)

    def _attention_scores(
        self,
        feats: torch.Tensor,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        layer: int,
        grid: Grid | None,
        *,
        fastv: bool,
        version: str,
        deepstack: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N,) importance of each visual token, from layer ``layer``'s rater attention.

        ``feats`` are the (N, d) LM input embeddings of the image; ``deepstack`` its
        (levels, N, d) features added after the first layers, if the family has them.
        """
        lm = self.get_language_model()  # type: ignore[attr-defined]
        device = feats.device
        prefix, suffix = prefix.to(device), suffix.to(device)
        text_ids = torch.cat([prefix, suffix])
        text = lm.embed_input_ids(text_ids).to(feats.dtype) if len(text_ids) else None
        p, n = len(prefix), feats.shape[0]
        parts = [x for x in (text[:p] if text is not None else None, feats) if x is not None]
        suffix_emb = text[p:] if text is not None else feats[:0]
        embeds = torch.cat([*parts, suffix_emb], dim=0)  # (L, d): prefix | image | suffix
        if len(suffix_emb) == 0:  # nothing after the image: the image's last token rates it
            raters = torch.tensor([n - 1], device=device)
        elif fastv:
            raters = torch.tensor([len(suffix_emb) - 1], device=device)
        else:
            raters = core.select_raters(feats, suffix_emb).to(device)
        rows = (raters + p + (n if len(suffix_emb) else 0)).long()
        positions = self._probe_positions(p, n, len(suffix_emb), grid, device)
        layers = lm.model.layers
        added = None
        if deepstack is not None:  # level i joins the visual rows after layer i
            added = embeds.new_zeros(len(deepstack), *embeds.shape)
            added[:, p : p + n] = deepstack.to(embeds.dtype)
        out = probe_layer(layers, embeds, positions, layer, rows, added=added)
        visual = slice(p, p + n)
        probs = core.rater_attention(out.q, out.k, rows, visual, scale=out.scaling)  # (H, R, N)
        heads_local = probs.shape[0]
        heads_total = heads_local * tp_world_size()
        if version == "v2" and not fastv:
            gravity = rope_gravity(
                layers[layer].self_attn, positions, rows, torch.arange(p, p + n, device=device)
            )
            keep = max(1, round(V2_PRIORITY_HEADS_FRACTION * heads_total))
            mass = tp_gather_heads(core.head_mass(probs))  # (H_total,)
            chosen = torch.topk(mass, keep).indices
            local = _local_heads(chosen, heads_local)
            if len(local) == 0:
                partial = torch.zeros(n, device=probs.device, dtype=torch.float32)
            else:
                partial = core.score_v2(probs, gravity, heads=len(local), head_ids=local) * len(
                    local
                )
            return tp_sum(partial) / keep
        return tp_sum(core.score_v15(probs) * heads_local) / heads_total


def _trace(**record: Any) -> None:
    """Append one JSON line per pruned image to $SPARSEVLM_TRACE (opt-in audit/debug trail)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    record["kept"] = record["kept"].tolist()
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _local_heads(global_ids: torch.Tensor, heads_local: int) -> torch.Tensor:
    """This rank's share of globally chosen head ids, as local indices."""
    if tp_world_size() == 1:
        return global_ids
    start = tp_rank() * heads_local
    mine = global_ids[(global_ids >= start) & (global_ids < start + heads_local)]
    return mine - start
