"""The per-request sparsity knob: one pydantic model shared by the vLLM plugin and the gateway.

vLLM requests carry it as ``mm_processor_kwargs = {"sparsevlm": {...}}``; gateway clients send it
as a top-level ``sparsity`` object. Pure Python (no torch, no vLLM) so the gateway can import it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

KNOB_KEY = "sparsevlm"
"""Key of the knob inside ``mm_processor_kwargs``."""

Method = Literal["sparsevlm", "random", "uniform", "fastv", "temporal", "off"]
Modality = Literal["image", "video"]
Version = Literal["v1.5", "v2"]
Scope = Literal["turn", "prompt"]


DEFAULT_COVERAGE = 0.2
"""``coverage`` of a `sparsevlm` knob that does not set it (tuned on the validation split)."""


class SparsityKnob(BaseModel):
    """How to prune one request's images; a budget ≥ an image's token count keeps it whole."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: Method = Field(
        "sparsevlm",
        description="`sparsevlm` (text-guided); baselines at the same budget: `random`, `uniform` "
        "(spatial grid), `fastv` (attention from the last text token), `temporal` (videos: the "
        "tokens that change most from the previous frame, EVS-like, query-agnostic; images: "
        "uniform); `off` disables pruning.",
    )
    visual_tokens: int | None = Field(
        None, ge=1, description="Visual tokens per image after pruning (kept + recycled)."
    )
    keep_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="Fraction of each image's visual tokens to keep."
    )
    video_tokens: int | None = Field(
        None,
        ge=1,
        description="Visual tokens per video after pruning, ranked over the whole video. Unset "
        "(and no `video_keep_ratio`): videos take the image budget (`visual_tokens` or "
        "`keep_ratio`).",
    )
    video_keep_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="Fraction of each video's visual tokens to keep."
    )
    temporal_threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Videos: a token whose cosine similarity to the same place in the previous "
        "frame is at least this is a repeat, and repeats are dropped before the text-guided "
        "ranking (only what the budget still needs is taken from them). Unset: off (the "
        "paper's ranking unchanged; docs/ALGORITHM.md). Methods `sparsevlm` and `fastv` only.",
    )
    max_visual_tokens: int | None = Field(
        None,
        ge=1,
        description="Ceiling on each image's or video's tokens, whatever the budget fields "
        "give (the gateway sets it to its operator's cap).",
    )
    recycle: bool | None = Field(
        None,
        description="Merge part of the pruned tokens back as cluster means (SparseVLM token "
        "recycling, the paper's v1.5 default). Default: off, the better measured setting "
        "(docs/BENCHMARKS.md).",
    )
    version: Version = Field("v1.5", description="`v1.5` (paper, ICML) or `v2` (SparseVLM+).")
    coverage: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Spread the kept tokens over the relevant content instead of taking the "
        "top-scored ones (relevance-conditioned DPP, docs/ALGORITHM.md): larger spreads more, "
        "1 ignores relevance, 0 is plain top-K. Unset: "
        f"{DEFAULT_COVERAGE} for `sparsevlm` (the measured best, docs/BENCHMARKS.md), top-K for "
        "`fastv`. Methods `sparsevlm` and `fastv` only.",
    )
    score_layer: int = Field(
        2,
        ge=0,
        description="Decoder layer whose attention scores the visual tokens (0 = on the input "
        "embeddings; must be below the model's layer count).",
    )
    scope: Scope = Field(
        "prompt",
        description="Which text rates an image. `prompt` (default): all the text after it, so "
        "every new question re-selects (the vision tower still runs once per image). `turn`: "
        "the text before it and its own user turn up to where the assistant's reply begins, so "
        "later turns of a conversation keep the selection and vLLM's prefix and encoder caches "
        "hit: much faster follow-ups, but they are answered from the tokens chosen for the "
        "image's own turn (docs/BENCHMARKS.md).",
    )

    @field_validator("coverage")
    @classmethod
    def _coverage_needs_scores(cls, value: float | None, info: ValidationInfo) -> float | None:
        method = info.data.get("method", "sparsevlm")
        if value is not None and method not in ("sparsevlm", "fastv"):
            raise ValueError(
                f"spreads a score-based selection: it needs method 'sparsevlm' or 'fastv', "
                f"not {method!r}"
            )
        return value

    @field_validator("temporal_threshold")
    @classmethod
    def _temporal_needs_scores(cls, value: float | None, info: ValidationInfo) -> float | None:
        method = info.data.get("method", "sparsevlm")
        if value is not None and method not in ("sparsevlm", "fastv"):
            raise ValueError(
                f"drops repeats before a score-based ranking: it needs method 'sparsevlm' or "
                f"'fastv', not {method!r} (method 'temporal' ranks by change alone)"
            )
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> SparsityKnob:
        if self.visual_tokens is not None and self.keep_ratio is not None:
            raise ValueError("give either visual_tokens or keep_ratio, not both")
        if self.video_tokens is not None and self.video_keep_ratio is not None:
            raise ValueError("give either video_tokens or video_keep_ratio, not both")
        if self.method == "off":
            for name in ("max_visual_tokens", "video_tokens", "video_keep_ratio"):
                if getattr(self, name) is not None:
                    raise ValueError(f"method 'off' keeps every token: it takes no {name}")
        elif self.visual_tokens is None and self.keep_ratio is None:
            if self.video_tokens is None and self.video_keep_ratio is None:
                raise ValueError(
                    "pruning needs a budget: set visual_tokens or keep_ratio (and, for videos "
                    "only, video_tokens or video_keep_ratio)"
                )
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    @property
    def coverage_applied(self) -> float:
        """The coverage c the selection uses (0: plain top-K)."""
        if self.coverage is not None:
            return self.coverage
        return DEFAULT_COVERAGE if self.method == "sparsevlm" else 0.0

    @property
    def recycle_enabled(self) -> bool:
        """Recycling applies to SparseVLM only, and only when asked for."""
        return self.method == "sparsevlm" and bool(self.recycle)

    @property
    def temporal_applied(self) -> float:
        """The temporal threshold the video selection uses (0: no temporal stage)."""
        return self.temporal_threshold or 0.0

    def _budget_fields(self, modality: Modality) -> tuple[int | None, float | None]:
        if modality == "video" and (
            self.video_tokens is not None or self.video_keep_ratio is not None
        ):
            return self.video_tokens, self.video_keep_ratio
        return self.visual_tokens, self.keep_ratio

    def prunes(self, modality: Modality) -> bool:
        """Whether this knob gives items of ``modality`` a budget at all (a knob with only
        video fields leaves images whole)."""
        tokens, ratio = self._budget_fields(modality)
        return self.enabled and (tokens is not None or ratio is not None)

    def budget(self, num_tokens: int, modality: Modality = "image") -> int:
        """Final visual-token count for an item of ``num_tokens`` tokens (never more than it)."""
        tokens, ratio = self._budget_fields(modality)
        if not self.enabled or (tokens is None and ratio is None):
            return num_tokens
        if tokens is not None:
            asked = tokens
        else:
            assert ratio is not None
            asked = max(1, int(ratio * num_tokens + 0.5))
        return min(num_tokens, asked, self.max_visual_tokens or num_tokens)

    def canonical(self) -> dict[str, Any]:
        """Explicit, order-stable form of the whole knob (logs, and the engine's copy of it)."""
        return {
            **self.selection_identity(),
            "video_tokens": self.video_tokens,
            "video_keep_ratio": self.video_keep_ratio,
            "temporal_threshold": self.temporal_threshold,
            "scope": self.scope,
        }

    def selection_identity(self, modality: Modality = "image") -> dict[str, Any]:
        """What decides an item's selection besides its text: equal ones select alike.

        ``scope`` is not part of it: it only decides which text is handed to the selection,
        and that text is hashed on its own. Per modality: an image's identity holds no video
        field, so a change of video budget never costs an image its cache entries.
        """
        tokens, ratio = self._budget_fields(modality)
        identity = {
            "method": self.method,
            "visual_tokens": tokens,
            "keep_ratio": ratio,
            "max_visual_tokens": self.max_visual_tokens,
            "recycle": self.recycle_enabled,
            "version": self.version,
            "score_layer": self.score_layer,
            "coverage": self.coverage_applied if self.method in ("sparsevlm", "fastv") else None,
        }
        if modality == "video":
            identity["temporal_threshold"] = self.temporal_applied
        return identity


class KnobError(ValueError):
    """A knob that fails validation; the message names the offending field(s)."""


def parse_knob(raw: Any) -> SparsityKnob:
    """Validate a raw knob (dict, JSON-decoded) into a SparsityKnob, or raise KnobError."""
    if isinstance(raw, SparsityKnob):
        return raw
    if not isinstance(raw, dict):
        raise KnobError(f"{KNOB_KEY}: expected an object, got {type(raw).__name__}")
    try:
        return SparsityKnob.model_validate(raw)
    except ValidationError as exc:
        raise KnobError(describe_validation_error(exc, prefix=KNOB_KEY)) from None


def describe_validation_error(exc: ValidationError, prefix: str) -> str:
    """One line per problem, each naming the field, e.g. ``sparsevlm.visual_tokens: ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]))
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
