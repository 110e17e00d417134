"""Processor side of the seam (API-server process): fix each image's kept count per request.

The processor expands every image placeholder *before* the vision tower runs, so this is where the
budget K becomes the prompt's real length. It also hands the model executor what SparseVLM needs to
pick *which* K tokens: the request's own token ids around each image (the raters live after it).

Cache safety: when pruning is on, the knob, the whole prompt and the image's ordinal are folded
into the multimodal identity (processor cache, encoder cache and prefix-cache blocks all key on
it), so one question's selection is never served to another. Unpruned requests keep vLLM's
hashes untouched.
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

import torch
from prometheus_client import Counter
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from sparse_plugin.contract import KNOB_KEY, KnobError, SparsityKnob, parse_knob

logger = logging.getLogger("vllm.plugins.sparsevlm")

DEFAULT_KNOB_ENV = "SPARSEVLM_DEFAULT"
"""Server-side default knob (JSON), applied to requests that carry none."""

# Per-item tensors handed to the model executor (declared batched, kept on CPU).
PARAMS_FIELD = "sparsevlm_params"  # LongTensor (5,): method, budget, recycle, version, score_layer
PREFIX_FIELD = (
    "sparsevlm_prefix"  # LongTensor (P,): prompt ids before the image (other images dropped)
)
SUFFIX_FIELD = (
    "sparsevlm_suffix"  # LongTensor (S,): prompt ids after the image (other images dropped)
)
FIELDS = (PARAMS_FIELD, PREFIX_FIELD, SUFFIX_FIELD)

METHOD_IDS = {"sparsevlm": 0, "random": 1, "uniform": 2, "fastv": 3}
VERSION_IDS = {"v1.5": 0, "v2": 1}

VISUAL_TOKENS_ORIGINAL = Counter(
    "sparsevlm_engine_visual_tokens_original_total",
    "Visual tokens the requests' images would occupy without pruning.",
    ["model"],
)
VISUAL_TOKENS_KEPT = Counter(
    "sparsevlm_engine_visual_tokens_kept_total",
    "Visual tokens that entered the language model after pruning.",
    ["model"],
)

# True while vLLM builds profiling / warm-up inputs: never pruned, never counted.
_IN_DUMMY: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsevlm_dummy", default=False)
# Ordinals (within the request) of the image items the HF processor is running on right now.
_ORDINALS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "sparsevlm_ordinals", default=None
)


def load_default_knob() -> SparsityKnob | None:
    raw = os.environ.get(DEFAULT_KNOB_ENV, "").strip()
    if not raw:
        return None
    try:
        return parse_knob(json.loads(raw))
    except (json.JSONDecodeError, KnobError) as exc:
        raise ValueError(f"{DEFAULT_KNOB_ENV} is not a valid sparsity knob: {exc}") from exc


def split_around_images(prompt: Sequence[int], image_token_id: int) -> list[tuple[list, list]]:
    """(prefix, suffix) ids for each image in ``prompt``; every image's own tokens are removed.

    A run of consecutive image tokens counts as one image (prompts may arrive already expanded).
    """
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(prompt):
        if prompt[i] == image_token_id:
            j = i
            while j < len(prompt) and prompt[j] == image_token_id:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    text = [t for t in prompt if t != image_token_id]
    out = []
    for start, _ in runs:
        n_before = sum(1 for t in prompt[:start] if t != image_token_id)
        out.append((text[:n_before], text[n_before:]))
    return out


def without_knob(hf_kwargs: Mapping[str, object]) -> dict[str, object]:
    """The HF processor kwargs minus our knob (HF and vLLM's own code must never see it)."""
    return {k: v for k, v in hf_kwargs.items() if k != KNOB_KEY}


def item_budget(item: Any) -> int | None:
    """The budget K stored in one image's multimodal kwargs item (None: not pruned)."""
    if item is None:
        return None
    elem = item.get(PARAMS_FIELD)
    return None if elem is None else int(elem.data[1])


def _fold(item_hash: str, salt: str) -> str:
    return hashlib.sha256(f"{item_hash}|{salt}".encode()).hexdigest()


class SparseProcessorMixin:
    """Mixin for a vLLM ``BaseMultiModalProcessor`` subclass of an image model.

    The model family's processor supplies ``_num_image_tokens(mm_items, idx, hf_kwargs)`` (the
    unpruned count) and ``_image_token_id()`` (the token an image's placeholder repeats); the rest
    is shared: each pruned image's placeholder run becomes K copies of that token (markers around
    it, e.g. Qwen's ``<|vision_start|>``/``<|vision_end|>``, are left as they are).
    """

    _default_knob: SparsityKnob | None
    info: Any

    # -- family hooks --------------------------------------------------------------------------
    def _image_token_id(self) -> int:
        raise NotImplementedError

    def _num_image_tokens(
        self, mm_items: MultiModalDataItems, item_idx: int, hf_kwargs: Mapping[str, object]
    ) -> int:
        raise NotImplementedError

    def _num_layers(self) -> int:
        return int(self.info.get_hf_config().text_config.num_hidden_layers)

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
        n_images = len(inputs.mm_data_items.get("image", []) or [])
        if knob is not None and n_images:
            hf_kwargs[KNOB_KEY] = {"canonical": knob.canonical(), "prompt": list(inputs.prompt)}
        with self._processing_all(n_images):
            result = super().apply(replace(inputs, hf_processor_mm_kwargs=hf_kwargs), timing_ctx)
        if not _IN_DUMMY.get() and n_images:
            self._count(inputs.mm_data_items, result, hf_kwargs)
        return result

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, without_knob(hf_processor_mm_kwargs), out_mm_kwargs
        )
        n_images = mm_items.get_all_counts().get("image", 0)
        if not any(self.kept_count(out_mm_kwargs, i) is not None for i in range(n_images)):
            return updates  # unpruned requests: vLLM's own updates, untouched
        return [
            self._pruned_update(u, out_mm_kwargs) if u.modality == "image" else u for u in updates
        ]

    def _pruned_update(
        self, update: PromptUpdate, out_mm_kwargs: MultiModalKwargsItems
    ) -> PromptUpdate:
        """``update`` with each pruned image's replacement cut to K placeholder tokens."""
        image_token_id = self._image_token_id()
        unpruned = update.replacement

        def replacement(item_idx: int) -> Any:
            kept = self.kept_count(out_mm_kwargs, item_idx)
            if kept is None:
                return unpruned(item_idx) if callable(unpruned) else unpruned
            return [image_token_id] * kept

        return PromptReplacement(modality="image", target=update.target, replacement=replacement)

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        resolved = inputs.hf_processor_mm_kwargs.get(KNOB_KEY)
        if not resolved or "image" not in hashes:
            return hashes
        # The prompt and knob are already hashed (they sit in mm kwargs); the ordinal tells two
        # copies of one image apart: their text before/after differs, so their selection does too.
        hashes = dict(hashes)
        hashes["image"] = [_fold(h, f"ordinal={i}") for i, h in enumerate(hashes["image"])]
        return hashes

    def _get_cache_missing_items(self, cache: Any, mm_data_items: Any, mm_hashes: Any) -> Any:
        mm_is_cached, missing = super()._get_cache_missing_items(  # type: ignore[misc]
            cache, mm_data_items, mm_hashes
        )
        cached = mm_is_cached.get("image", [])
        _ORDINALS.set([i for i, hit in enumerate(cached) if not hit])
        return mm_is_cached, missing

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        hf_kwargs = without_knob(hf_kwargs)
        return super()._call_hf_processor(hf_data, hf_kwargs)  # type: ignore[misc]

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed = super()._postprocess_hf_mm_data(  # type: ignore[misc]
            mm_inputs, hf_processor_mm_kwargs, processed_data
        )
        resolved = hf_processor_mm_kwargs.get(KNOB_KEY)
        if not resolved:
            return processed
        assert isinstance(resolved, dict)
        knob = SparsityKnob.model_validate(
            {k: v for k, v in resolved["canonical"].items() if v is not None}
        )
        prompt = resolved["prompt"]
        ordinals = _ORDINALS.get() or []
        around = split_around_images(prompt, self._image_token_id())
        items = self.info.parse_mm_data({"image": mm_inputs.get("images", [])}, validate=False)
        params, prefixes, suffixes = [], [], []
        hf_kwargs = without_knob(hf_processor_mm_kwargs)
        for local_idx, ordinal in enumerate(ordinals):
            n = self._num_image_tokens(items, local_idx, hf_kwargs)
            params.append(
                torch.tensor(
                    [
                        METHOD_IDS[knob.method],
                        knob.budget(n),
                        int(knob.recycle_enabled),
                        VERSION_IDS[knob.version],
                        knob.score_layer,
                    ],
                    dtype=torch.long,
                )
            )
            prefix, suffix = around[ordinal] if ordinal < len(around) else ([], [])
            prefixes.append(torch.tensor(prefix, dtype=torch.long))
            suffixes.append(torch.tensor(suffix, dtype=torch.long))
        processed[PARAMS_FIELD] = torch.stack(params) if params else torch.empty(0, 5)
        processed[PREFIX_FIELD] = prefixes
        processed[SUFFIX_FIELD] = suffixes
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        if PARAMS_FIELD in hf_inputs:
            for name in FIELDS:
                config[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return config

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def kept_count(out_mm_kwargs: MultiModalKwargsItems, item_idx: int) -> int | None:
        """The budget fixed for image ``item_idx`` (None when that image is not pruned)."""
        items = out_mm_kwargs.get("image", [])
        return item_budget(items[item_idx]) if item_idx < len(items) else None

    @contextlib.contextmanager
    def _processing_all(self, n_images: int) -> Iterator[None]:
        token = _ORDINALS.set(list(range(n_images)))
        try:
            yield
        finally:
            _ORDINALS.reset(token)

    def _count(
        self, mm_items: MultiModalDataItems, result: Any, hf_kwargs: Mapping[str, object]
    ) -> None:
        model = self._model_label()
        hf_kwargs = without_knob(hf_kwargs)
        original = sum(
            self._num_image_tokens(mm_items, i, hf_kwargs)
            for i in range(len(mm_items.get("image", [])))
        )
        kept = sum(r.length for r in result["mm_placeholders"].get("image", []))
        VISUAL_TOKENS_ORIGINAL.labels(model=model).inc(original)
        VISUAL_TOKENS_KEPT.labels(model=model).inc(kept)

    def _model_label(self) -> str:
        name = self.info.ctx.model_config.served_model_name
        return name[0] if isinstance(name, list) else str(name)
