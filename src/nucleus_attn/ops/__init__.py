"""Numeric building blocks of sparse decode, each a torch reference plus a Triton kernel.

One module per op family; the public function of each op validates once and dispatches
(``impl="auto"``: Triton on CUDA tensors, the torch reference elsewhere; see
:mod:`nucleus_attn.ops._dispatch`). Results are index lists per KV head, so a paged
backend can call the ops unchanged.
"""

from .attention import dense_attention, gathered_scores, sparse_attention
from .clusters import (
    assign_nearest,
    centroid_scores,
    cluster_spread,
    cluster_tokens,
    kmeans,
    split_outliers,
)
from .pages import (
    PageStats,
    last_page_minmax,
    page_minmax,
    page_scores,
    page_stats_reference,
    page_valid,
    pages_to_tokens,
    topk_pages,
    topk_pages_uses_stats,
)
from .quant import (
    dequantize_int4,
    int4_estimates,
    int4_scores,
    int4_scores_range,
    quantize_int4,
    quantize_query,
)
from .select import (
    compact,
    group_logsoftmax_max,
    indices_to_mask,
    keep_best,
    mask_to_indices,
)
from .tactic_select import (
    ClusterMasses,
    ClusterRanking,
    append_clusters,
    cluster_lse,
    rank_clusters,
    tactic_cut,
)
from .topp import (
    Estimates,
    topp_nucleus,
    topp_select,
    topp_select_estimates,
    topp_select_range,
    topp_threshold_reference,
    topp_weights,
)

__all__ = [
    "ClusterMasses",
    "ClusterRanking",
    "Estimates",
    "PageStats",
    "append_clusters",
    "assign_nearest",
    "centroid_scores",
    "cluster_lse",
    "cluster_spread",
    "cluster_tokens",
    "compact",
    "dense_attention",
    "dequantize_int4",
    "gathered_scores",
    "group_logsoftmax_max",
    "indices_to_mask",
    "int4_estimates",
    "int4_scores",
    "int4_scores_range",
    "keep_best",
    "kmeans",
    "mask_to_indices",
    "last_page_minmax",
    "page_minmax",
    "page_scores",
    "page_stats_reference",
    "page_valid",
    "pages_to_tokens",
    "quantize_int4",
    "quantize_query",
    "rank_clusters",
    "sparse_attention",
    "split_outliers",
    "tactic_cut",
    "topk_pages",
    "topk_pages_uses_stats",
    "topp_nucleus",
    "topp_select",
    "topp_select_estimates",
    "topp_select_range",
    "topp_threshold_reference",
    "topp_weights",
]
