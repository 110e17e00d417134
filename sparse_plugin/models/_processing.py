"""Processor side of the seam (API-server process): fix each image's kept count per request.

The processor expands every image placeholder *before* the vision tower runs, so this is where the
budget K becomes the prompt's real length. It also hands the model executor what SparseVLM needs to
pick *which* K tokens: each image's context (the prompt ids before it and the ids after it that
rate it, ``sparse_plugin/core/context.py``), and a content key for the vision-tower cache.

Cache identity: a pruned image's multimodal hash is vLLM's own hash of the image, folded with the
selection knob and the image's context — exactly what its selection depends on, nothing more. So
one question's selection is never served to another, while every later turn of a conversation
(turn scope: the context ends where the assistant's reply begins) reproduces the same hash, and
vLLM's processor, encoder and prefix caches all hit. Unpruned requests keep vLLM's hashes
untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from prometheus_client import Counter
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from sparse_plugin.contract import KNOB_KEY, KnobError, SparsityKnob, parse_knob
from sparse_plugin.core.context import item_contexts
from sparse_plugin.models._turns import resolve_turn_end

logger = logging.getLogger("vllm.plugins.sparsevlm")

DEFAULT_KNOB_ENV = "SPARSEVLM_DEFAULT"
"""Server-side default knob (JSON), applied to requests that carry none."""

# Per-item tensors handed to the model executor (declared batched per modality, kept on CPU).
PARAMS_FIELD = "sparsevlm_params"  # LongTensor (7,): method, budget, recycle, version, score_layer,
# coverage and temporal threshold in millionths (0: plain top-K / no temporal stage)
PREFIX_FIELD = "sparsevlm_prefix"  # LongTensor (P,): prompt ids before the item (items dropped)
SUFFIX_FIELD = "sparsevlm_suffix"  # LongTensor (S,): ids after the item that rate it
IMAGE_KEY_FIELD = "sparsevlm_image_key"  # uint8 (32,): the item's text-free content identity
FIELDS = (PARAMS_FIELD, PREFIX_FIELD, SUFFIX_FIELD, IMAGE_KEY_FIELD)
NUM_PARAMS = 7


def fields(modality: str) -> tuple[str, str, str, str]:
    """The four field names of ``modality``'s items (a field is batched over one modality, so
    videos need names of their own: ``sparsevlm_video_params`` ...)."""
    if modality == "image":
        return FIELDS
    p, x, s, k = (f.replace("sparsevlm_", f"sparsevlm_{modality}_", 1) for f in FIELDS)
    return p, x, s, k


COVERAGE_SCALE = 1_000_000  # coverage and temporal threshold travel as integers in the params
METHOD_IDS = {"sparsevlm": 0, "random": 1, "uniform": 2, "fastv": 3, "temporal": 4}
VERSION_IDS = {"v1.5": 0, "v2": 1}

VISUAL_TOKENS_ORIGINAL = Counter(
    "sparsevlm_engine_visual_tokens_original_total",
    "Visual tokens the requests' images and videos would occupy without pruning.",
    ["model", "modality"],
)
VISUAL_TOKENS_KEPT = Counter(
    "sparsevlm_engine_visual_tokens_kept_total",
    "Visual tokens that entered the language model after pruning.",
    ["model", "modality"],
)

# True while vLLM builds profiling / warm-up inputs: never pruned, never counted.
_IN_DUMMY: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsevlm_dummy", default=False)
# Per modality, ordinals (within the request) of the items the HF processor is running on now.
_ORDINALS: contextvars.ContextVar[dict[str, list[int]] | None] = contextvars.ContextVar(
    "sparsevlm_ordinals", default=None
)
# This request's pruning plan while the HF processor runs without it (_apply_hf_processor_main).
_PLAN: contextvars.ContextVar[object] = contextvars.ContextVar("sparsevlm_plan", default=None)


def load_default_knob() -> SparsityKnob | None:
    raw = os.environ.get(DEFAULT_KNOB_ENV, "").strip()
    if not raw:
        return None
    try:
        return parse_knob(json.loads(raw))
    except (json.JSONDecodeError, KnobError) as exc:
        raise ValueError(f"{DEFAULT_KNOB_ENV} is not a valid sparsity knob: {exc}") from exc


def without_knob(hf_kwargs: Mapping[str, object]) -> dict[str, object]:
    """The HF processor kwargs minus our knob (HF and vLLM's own code must never see it)."""
    return {k: v for k, v in hf_kwargs.items() if k != KNOB_KEY}


def item_budget(item: Any, modality: str = "image") -> int | None:
    """The budget K stored in one item's multimodal kwargs (None: not pruned)."""
    if item is None:
        return None
    elem = item.get(fields(modality)[0])
    return None if elem is None else int(elem.data[1])


def video_shape(video: Any) -> tuple[int, int, int]:
    """(frames, height, width) of a decoded video: (F, H, W, C) frames, or a list of PIL
    frames, alone or with its metadata as vLLM's loader returns it ``(frames, metadata)``."""
    if isinstance(video, tuple):
        video = video[0]
    if isinstance(video, np.ndarray | torch.Tensor):
        return int(video.shape[0]), int(video.shape[1]), int(video.shape[2])
    width, height = video[0].size
    return len(video), int(height), int(width)


def _fold(item_hash: str, salt: str) -> str:
    return hashlib.sha256(f"{item_hash}|{salt}".encode()).hexdigest()


def content_key(item_hash: str) -> torch.Tensor:
    """(32,) uint8 digest of vLLM's text-free hash of an image (keys the vision-tower cache)."""
    return torch.tensor(list(hashlib.sha256(item_hash.encode()).digest()), dtype=torch.uint8)


class SparseProcessorMixin:
    """Mixin for a vLLM ``BaseMultiModalProcessor`` subclass of an image (and video) model.

    The model family's processor supplies ``_num_image_tokens(mm_items, idx, hf_kwargs)`` (the
    unpruned count) and ``_image_token_id()`` (the token an image's placeholder repeats); a
    family that prunes videos too adds ``"video"`` to ``_pruned_modalities()`` and supplies
    ``_video_token_id()`` and ``_num_video_tokens(frames, height, width, hf_kwargs)``. The rest is
    shared: each pruned item's placeholder run becomes K copies of its token (markers around
    it, e.g. Qwen's ``<|vision_start|>``/``<|vision_end|>``, are left as they are).
    """

    _default_knob: SparsityKnob | None
    info: Any

    # -- family hooks --------------------------------------------------------------------------
    def _pruned_modalities(self) -> tuple[str, ...]:
        return ("image",)

    def _image_token_id(self) -> int:
        raise NotImplementedError

    def _video_token_id(self) -> int:
        raise NotImplementedError

    def _num_image_tokens(
        self, mm_items: MultiModalDataItems, item_idx: int, hf_kwargs: Mapping[str, object]
    ) -> int:
        raise NotImplementedError

    def _num_video_tokens(
        self, frames: int, height: int, width: int, hf_kwargs: Mapping[str, object]
    ) -> int:
        """Unpruned tokens of a video of ``frames`` decoded frames of height × width."""
        raise NotImplementedError

    def _num_layers(self) -> int:
        return int(self.info.get_hf_config().text_config.num_hidden_layers)

    def _placeholder_id(self, modality: str) -> int:
        return self._image_token_id() if modality == "image" else self._video_token_id()

    # -- knob --------------------------------------------------------------------------------
    def _resolve_knob(self, hf_kwargs: Mapping[str, object]) -> SparsityKnob | None:
        if _IN_DUMMY.get():
            return None
        if not hasattr(self, "_default_knob"):
            self._default_knob = load_default_knob()
        raw = hf_kwargs.get(KNOB_KEY)
        if raw is None:
            knob = self._default_knob
        else:
            try:
                knob = parse_knob(raw)
            except KnobError as exc:
                raise ValueError(str(exc)) from None
        if knob is None or not knob.enabled:
            return None
        if knob.score_layer >= self._num_layers():
            raise ValueError(
                f"{KNOB_KEY}.score_layer: must be below the model's {self._num_layers()} "
                f"decoder layers, got {knob.score_layer}"
            )
        return knob

    # -- vLLM hooks --------------------------------------------------------------------------
    def get_dummy_mm_inputs(self, *args: Any, **kwargs: Any) -> Any:
        token = _IN_DUMMY.set(True)
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)  # type: ignore[misc]
        finally:
            _IN_DUMMY.reset(token)

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        knob = self._resolve_knob(inputs.hf_processor_mm_kwargs)
        hf_kwargs = without_knob(inputs.hf_processor_mm_kwargs)
        counts = {m: len(inputs.mm_data_items.get(m, []) or []) for m in self._pruned_modalities()}
        pruned = {m: n for m, n in counts.items() if n and knob is not None and knob.prunes(m)}
        if knob is not None and pruned:
            hf_kwargs[KNOB_KEY] = self._pruning_plan(
                knob, replace(inputs, hf_processor_mm_kwargs=hf_kwargs), pruned
            )
        with self._processing_all(counts):
            result = super().apply(replace(inputs, hf_processor_mm_kwargs=hf_kwargs), timing_ctx)
        if not _IN_DUMMY.get() and any(counts.values()):
            self._count(inputs.mm_data_items, result, hf_kwargs)
        return result

    def _pruning_plan(
        self, knob: SparsityKnob, inputs: Any, pruned: Mapping[str, int]
    ) -> dict[str, Any]:
        """Everything the rest of this request's processing needs about its pruned items.

        ``inputs`` carries no knob: its hashes are vLLM's own, the items' text-free identity.
        """
        turn_end = self._turn_end() if knob.scope == "turn" else None
        ids = {m: self._placeholder_id(m) for m in self._pruned_modalities()}
        stock = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        plan: dict[str, Any] = {
            "canonical": knob.canonical(),
            "stock_hashes": stock,
            "contexts": {},
            "hashes": {},
        }
        for modality, n in pruned.items():
            others = [t for m, t in ids.items() if m != modality]
            contexts = item_contexts(inputs.prompt, ids[modality], turn_end, drop=others)
            contexts = (contexts + [([], [])] * n)[:n]  # items the prompt does not show: none
            selection = json.dumps(knob.selection_identity(modality), sort_keys=True)  # type: ignore[arg-type]
            plan["contexts"][modality] = contexts
            plan["hashes"][modality] = [
                _fold(h, f"{selection}|{json.dumps(ctx, separators=(',', ':'))}")
                for h, ctx in zip(stock[modality], contexts, strict=True)
            ]
        return plan

    def _turn_end(self) -> list[int] | None:
        if not hasattr(self, "_turn_end_ids"):
            self._turn_end_ids = resolve_turn_end(self.info)
        return self._turn_end_ids

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, without_knob(hf_processor_mm_kwargs), out_mm_kwargs
        )
        counts = mm_items.get_all_counts()
        modalities = self._pruned_modalities()
        if not any(
            self.kept_count(out_mm_kwargs, i, m) is not None
            for m in modalities
            for i in range(counts.get(m, 0))
        ):
            return updates  # unpruned requests: vLLM's own updates, untouched
        return [
            self._pruned_update(u, out_mm_kwargs) if u.modality in modalities else u
            for u in updates
        ]

    def _pruned_update(
        self, update: PromptUpdate, out_mm_kwargs: MultiModalKwargsItems
    ) -> PromptUpdate:
        """``update`` with each pruned item's replacement cut to K placeholder tokens."""
        modality = update.modality
        token_id = self._placeholder_id(modality)
        unpruned = update.replacement

        def replacement(item_idx: int) -> Any:
            kept = self.kept_count(out_mm_kwargs, item_idx, modality)
            if kept is None:
                return unpruned(item_idx) if callable(unpruned) else unpruned
            return [token_id] * kept

        return PromptReplacement(modality=modality, target=update.target, replacement=replacement)

    def _get_mm_hashes(self, inputs: Any) -> Any:
        plan = inputs.hf_processor_mm_kwargs.get(KNOB_KEY)
        if not plan:
            return super()._get_mm_hashes(inputs)  # type: ignore[misc]
        # Worked out once per request in _pruning_plan: vLLM's own hashes for every modality
        # (without our key), the pruned items' ones folded with their selection's inputs.
        return {**plan["stock_hashes"], **plan["hashes"]}

    def _get_cache_missing_items(self, cache: Any, mm_data_items: Any, mm_hashes: Any) -> Any:
        mm_is_cached, missing = super()._get_cache_missing_items(  # type: ignore[misc]
            cache, mm_data_items, mm_hashes
        )
        _ORDINALS.set(
            {
                m: [i for i, hit in enumerate(mm_is_cached.get(m, [])) if not hit]
                for m in self._pruned_modalities()
            }
        )
        return mm_is_cached, missing

    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # Every HF-processor call goes through here (some families, e.g. Qwen3-VL, call it
        # directly rather than through _call_hf_processor): the HF side never sees our key.
        # The plan comes back for the post-processing that reads it (_finalize_hf_mm_data).
        token = _PLAN.set(hf_kwargs.get(KNOB_KEY))
        try:
            return super()._apply_hf_processor_main(mm_items, without_knob(hf_kwargs))  # type: ignore[misc]
        finally:
            _PLAN.reset(token)

    def _finalize_hf_mm_data(
        self,
        hf_data: Mapping[str, object],
        hf_kwargs: Mapping[str, object],
        passthrough_data: Mapping[str, object],
        processed_data: BatchFeature | None = None,
    ) -> BatchFeature:
        plan = _PLAN.get()
        if plan is not None:
            hf_kwargs = {**hf_kwargs, KNOB_KEY: plan}
        return super()._finalize_hf_mm_data(  # type: ignore[misc]
            hf_data, hf_kwargs, passthrough_data, processed_data
        )

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed = super()._postprocess_hf_mm_data(  # type: ignore[misc]
            mm_inputs, hf_processor_mm_kwargs, processed_data
        )
        plan = hf_processor_mm_kwargs.get(KNOB_KEY)
        if not plan:
            return processed
        assert isinstance(plan, dict)
        knob = SparsityKnob.model_validate(
            {k: v for k, v in plan["canonical"].items() if v is not None}
        )
        hf_kwargs = without_knob(hf_processor_mm_kwargs)
        for modality, contexts in plan["contexts"].items():
            ordinals = (_ORDINALS.get() or {}).get(modality, [])
            counts = self._local_counts(modality, mm_inputs, processed, hf_kwargs, len(ordinals))
            params, prefixes, suffixes, keys = [], [], [], []
            for n, ordinal in zip(counts, ordinals, strict=True):
                params.append(self._params(knob, modality, n))
                prefix, suffix = contexts[ordinal]
                prefixes.append(torch.tensor(prefix, dtype=torch.long))
                suffixes.append(torch.tensor(suffix, dtype=torch.long))
                keys.append(content_key(plan["stock_hashes"][modality][ordinal]))
            params_f, prefix_f, suffix_f, key_f = fields(modality)
            processed[params_f] = torch.stack(params) if params else torch.empty(0, NUM_PARAMS)
            processed[prefix_f] = prefixes
            processed[suffix_f] = suffixes
            processed[key_f] = torch.stack(keys) if keys else torch.empty(0, 32, dtype=torch.uint8)
        return processed

    @staticmethod
    def _params(knob: SparsityKnob, modality: str, num_tokens: int) -> torch.Tensor:
        temporal = knob.temporal_applied if modality == "video" else 0.0
        return torch.tensor(
            [
                METHOD_IDS[knob.method],
                knob.budget(num_tokens, modality),  # type: ignore[arg-type]
                int(knob.recycle_enabled),
                VERSION_IDS[knob.version],
                knob.score_layer,
                round(knob.coverage_applied * COVERAGE_SCALE),
                round(temporal * COVERAGE_SCALE),
            ],
            dtype=torch.long,
        )

    def _local_counts(
        self,
        modality: str,
        mm_inputs: Mapping[str, object],
        processed: BatchFeature,
        hf_kwargs: Mapping[str, object],
        n: int,
    ) -> list[int]:
        """Unpruned token counts of the ``n`` items of ``modality`` this HF call processed."""
        if modality == "video":
            videos = list(mm_inputs.get("videos", []))  # type: ignore[call-overload]
            return [self._num_video_tokens(*video_shape(v), hf_kwargs) for v in videos[:n]]
        items = self.info.parse_mm_data({"image": mm_inputs.get("images", [])}, validate=False)
        return [self._num_image_tokens(items, i, hf_kwargs) for i in range(n)]

    def _num_tokens(
        self,
        modality: str,
        mm_items: MultiModalDataItems,
        item_idx: int,
        hf_kwargs: Mapping[str, object],
    ) -> int:
        if modality == "video":
            video = mm_items.get_items("video", VideoProcessorItems).get(item_idx)
            return self._num_video_tokens(*video_shape(video), hf_kwargs)
        return self._num_image_tokens(mm_items, item_idx, hf_kwargs)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        for modality in self._pruned_modalities():
            names = fields(modality)
            if names[0] in hf_inputs:
                for name in names:
                    config[name] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return config

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def kept_count(
        out_mm_kwargs: MultiModalKwargsItems, item_idx: int, modality: str = "image"
    ) -> int | None:
        """The budget fixed for item ``item_idx`` of ``modality`` (None when not pruned)."""
        items = out_mm_kwargs.get(modality, [])
        return item_budget(items[item_idx], modality) if item_idx < len(items) else None

    @contextlib.contextmanager
    def _processing_all(self, counts: Mapping[str, int]) -> Iterator[None]:
        token = _ORDINALS.set({m: list(range(n)) for m, n in counts.items()})
        try:
            yield
        finally:
            _ORDINALS.reset(token)

    def _count(
        self, mm_items: MultiModalDataItems, result: Any, hf_kwargs: Mapping[str, object]
    ) -> None:
        model = self._model_label()
        hf_kwargs = without_knob(hf_kwargs)
        for modality in self._pruned_modalities():
            placeholders = result["mm_placeholders"].get(modality, [])
            if not placeholders:
                continue
            original = sum(
                self._num_tokens(modality, mm_items, i, hf_kwargs)
                for i in range(len(mm_items.get(modality, [])))
            )
            kept = sum(r.length for r in placeholders)
            VISUAL_TOKENS_ORIGINAL.labels(model=model, modality=modality).inc(original)
            VISUAL_TOKENS_KEPT.labels(model=model, modality=modality).inc(kept)

    def _model_label(self) -> str:
        name = self.info.ctx.model_config.served_model_name
        return name[0] if isinstance(name, list) else str(name)
