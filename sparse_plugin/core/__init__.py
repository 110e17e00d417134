"""SparseVLM's algorithm in plain PyTorch (no vLLM import): raters, scores, budgets, recycling.

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(arXiv 2410.04417, ICML 2025); reference code github.com/Gumpest/SparseVLMs. See docs/ALGORITHM.md.
"""

from .attention import rater_attention
from .budget import (
    PRUNE_LAYERS,
    RECYCLE_TAU,
    STAGE_LISTS,
    adaptive_keep,
    budget_schedule,
    recycle_clusters,
    split_budget,
    stage_keep,
)
from .coverage import coverage_indices
from .raters import select_raters, text_relevance
from .recycle import dpc_knn_clusters, recycle_tokens
from .scores import guard_gravity, head_mass, rope_gravity, score_v2, score_v15
from .select import (
    Selection,
    random_indices,
    select_images,
    select_visual_tokens,
    top_k_sorted,
    uniform_indices,
)
from .temporal import novel_candidates, repeat_similarity, temporal_indices

__all__ = [
    "PRUNE_LAYERS",
    "RECYCLE_TAU",
    "STAGE_LISTS",
    "Selection",
    "adaptive_keep",
    "budget_schedule",
    "coverage_indices",
    "dpc_knn_clusters",
    "guard_gravity",
    "head_mass",
    "random_indices",
    "rater_attention",
    "recycle_clusters",
    "recycle_tokens",
    "rope_gravity",
    "score_v2",
    "score_v15",
    "select_images",
    "select_raters",
    "select_visual_tokens",
    "split_budget",
    "stage_keep",
    "text_relevance",
    "novel_candidates",
    "repeat_similarity",
    "temporal_indices",
    "top_k_sorted",
    "uniform_indices",
]
