"""Twilight: a base selector proposes generously, then top-p on 4-bit estimated weights prunes.

Lin et al., "Twilight: Adaptive Attention Sparsity with Hierarchical Top-p Pruning", 2025
(https://arxiv.org/abs/2502.02770). Select-then-prune: (1) a base selector proposes
``base_budget`` candidates; (2) their logits are estimated from 4-bit keys (a quarter of
the key bytes); (3) each query head keeps the smallest set of candidates whose estimated
softmax mass reaches ``p`` (the KV head keeps the union); (4) exact attention runs over the
kept set. The budget adapts per head, layer and step.

The pruner can only keep what the base proposes, so the base decides whether heavy tokens
survive. Three bases:

- ``"dense"`` (default): every valid key is a candidate; the 4-bit estimates of all of them
  are pruned directly (one streaming pass over the int4 keys, 68 bytes a token and KV head
  at d=128 in bf16, no candidate index list). Chosen by measurement: on the bundled model
  it keeps the needle on every retrieval head, and it is the only base whose lowest
  per-head kept mass stays near ``p`` (a capped candidate set cannot hold ``p`` of a flat
  head's mass); see ``notes/twilight_bases.md``.
- ``"quest"`` (the paper's): pages ranked by Quest's upper bound from per-page key
  min/max, ``base_budget`` tokens of them. On varied text a page's per-channel range is
  wide and the bound ranks how varied a page is as much as how well it matches the query,
  so it loses needles (pages of 4 lose fewer, but their bounds cost more bytes than the
  4-bit keys of every token).
- ``"cluster"``: K-means clusters of the keys (Tactic's :class:`ClusterState`) ranked by
  q.centroid; the best clusters up to ``base_budget`` tokens, plus the sink, the window
  and the tokens appended since clustering, are the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import ops
from ..span import KeySpan
from .base import (
    Budget,
    MethodConfig,
    MethodSpec,
    Selection,
    check_budget,
    check_int,
    check_p,
    check_sink_window,
    grow,
    last_index,
    resolve_budget,
    sink_window_positions,
)
from .quest import PageState, select_pages
from .tactic import ClusterState, TacticConfig

#: Candidate selectors (``TwilightConfig.base``).
BASES = ("quest", "dense", "cluster")


@dataclass(frozen=True)
class TwilightConfig(MethodConfig):
    """Hierarchical top-p pruning.

    Parameters
    ----------
    p : float
        Estimated attention mass each query head keeps, in (0, 1] (default 0.9: on the
        bundled model's retrieval study it matches dense accuracy with ~9.5% of the tokens
        kept, against ~15% at 0.95); ``p=1`` is dense attention.
    base : str
        Candidate selector (see the module doc): ``"dense"`` (every valid key is a
        candidate; the pruner alone decides; default), ``"quest"`` (pages ranked by their
        upper bound, the paper's) or ``"cluster"`` (K-means clusters ranked by
        q.centroid).
    base_budget : int or float
        Candidates proposed by the ``"quest"`` and ``"cluster"`` bases, tokens (int) or
        fraction of N (float); default 0.25. The sink and window count towards it.
        Ignored by ``"dense"``.
    page_size : int
        Page size of the ``"quest"`` base (default 16).
    cluster_size, iterations, segment : int
        K-means of the ``"cluster"`` base: average keys per cluster (16), iterations at
        prefill (10), positions clustered together (4096); as Tactic's.
    recluster_every : int
        ``"cluster"`` base: decode tokens after which the cache is clustered again (2048);
        until then they are candidates by position, like the window.
    sink, window : int
        Tokens always kept at the start / end of each sequence (default 4 / 64).
    """

    name: ClassVar[str] = "twilight"
    p: float = 0.9
    base: str = "dense"
    base_budget: Budget = 0.25
    page_size: int = 16
    cluster_size: int = 16
    iterations: int = 10
    segment: int = 4096
    recluster_every: int = 2048
    sink: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        check_p(self.name, self.p)
        if self.base not in BASES:
            raise ValueError(f"twilight: base={self.base!r} is not one of {BASES}; "
                             'e.g. base="dense" prunes the 4-bit estimates of every key')
        check_budget(self.name, "base_budget", self.base_budget)
        check_int(self.name, "page_size", self.page_size, 1)
        check_int(self.name, "cluster_size", self.cluster_size, 1)
        check_int(self.name, "iterations", self.iterations, 1)
        check_int(self.name, "segment", self.segment, self.cluster_size)
        check_int(self.name, "recluster_every", self.recluster_every, 1)
        check_sink_window(self.name, self.sink, self.window)

    def cluster_config(self) -> TacticConfig:
        """The clustering parameters as the :class:`TacticConfig` a :class:`ClusterState`
        is built from (only its clustering fields are read)."""
        return TacticConfig(cluster_size=self.cluster_size, iterations=self.iterations,
                            segment=self.segment, recluster_every=self.recluster_every,
                            sink=self.sink, window=self.window)


@dataclass
class Int4Keys:
    """4-bit copies of one layer's keys: codes ``[B, Hkv, N, d/2]``, scale/zero ``[B, Hkv, N]``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    n: int

    @staticmethod
    def build(k: Tensor) -> Int4Keys:
        return Int4Keys(*ops.quantize_int4(k), k.shape[2])

    def extend(self, k: Tensor, span: KeySpan) -> None:
        n = k.shape[2]
        if n <= self.n:
            return
        codes, scale, zero = ops.quantize_int4(k[:, :, self.n:])
        self.codes = grow(self.codes, n)
        self.scale = grow(self.scale, n)
        self.zero = grow(self.zero, n)
        self.codes[:, :, self.n:n] = codes
        self.scale[:, :, self.n:n] = scale
        self.zero[:, :, self.n:n] = zero
        self.n = n

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        """Quantize each sequence's newest key in place (static cache)."""
        b, h, _, d = k.shape
        codes, scale, zero = ops.quantize_int4(k.gather(2, last_index(span, h, d)))
        self.codes.scatter_(2, last_index(span, h, codes.shape[-1]), codes)
        self.scale.scatter_(2, last_index(span, h), scale)
        self.zero.scatter_(2, last_index(span, h), zero)


@dataclass
class TwilightState:
    """The 4-bit keys and the base selector's metadata: page bounds (``base="quest"``) or
    clusters (``base="cluster"``), None otherwise."""

    pages: PageState | None
    keys: Int4Keys
    clusters: ClusterState | None = None
    # the clusters' size bound at the build: it sizes the candidate list, so it is
    # compared (not taken over) when a request's state is copied into the previous one's
    # buffers (the clusters' own max_size is a host counter there)
    cluster_bound: int = 0

    def extend(self, k: Tensor, span: KeySpan) -> None:
        if self.pages is not None:
            self.pages.extend(k, span)
        if self.clusters is not None:
            self.clusters.extend(k, span)
        self.keys.extend(k, span)

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        if self.pages is not None:
            self.pages.refresh(k, span)
        if self.clusters is not None:
            self.clusters.refresh(k, span)
        self.keys.refresh(k, span)


def new_state(k: Tensor, span: KeySpan, cfg: TwilightConfig) -> TwilightState:
    pages = PageState.build(k, span, cfg.page_size) if cfg.base == "quest" else None
    clusters = (ClusterState.build(k, span, cfg.cluster_config()) if cfg.base == "cluster"
                else None)
    return TwilightState(pages, Int4Keys.build(k), clusters,
                         clusters.max_size if clusters is not None else 0)


def cluster_candidates(
    q: Tensor, clusters: ClusterState, span: KeySpan, n: int, budget: int, sink: int,
    window: int, scale: float, size_bound: int = 0,
) -> tuple[Tensor, Tensor]:
    """Candidates of the ``"cluster"`` base: the best clusters up to ``budget`` tokens.

    Clusters are ranked per KV head by the group's maximum log-softmax of q.centroid
    (as Tactic ranks them). The sink, the window and the tokens appended since clustering
    are candidates by position and count towards the budget; the best clusters fill the
    rest, whole, each counting the members that are not such fixed tokens (the last one
    may overshoot by less than a cluster). A position is listed once.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    clusters : ClusterState
        The layer's clusters.
    span : KeySpan
        Valid positions of the cache.
    n : int
        Cache positions N.
    budget : int
        Candidate tokens wanted per KV head.
    sink, window : int
        Tokens kept by position at the start / end of each sequence.
    scale : float
        Softmax scale.

    Returns
    -------
    candidates : Tensor
        ``[B, Hkv, M]`` int64 positions, cluster by cluster in rank order, then the fixed
        tokens not inside a chosen cluster; the first ``counts`` live, 0 after them.
    counts : Tensor
        ``[B, Hkv]`` int64.
    """
    b = q.shape[0]
    hkv = clusters.sizes.shape[1]
    # reads: C centroids (d values each) per KV head, then C-long rows and the positions of
    # the chosen members; no pass over the N keys
    cs = ops.centroid_scores(q, clusters.centroids, clusters.sizes, scale)  # [B, Hq, C]
    order = torch.argsort(ops.group_logsoftmax_max(cs, hkv), dim=-1, descending=True)
    c = clusters.sizes.shape[-1]
    fixed, fcnt = sink_window_positions(span, n, sink, window, clusters.ends,
                                        clusters.unclustered())  # [B, F], [B]
    f = fixed.shape[-1]
    fixed = fixed[:, None, :].expand(b, hkv, f)
    fixed_live = torch.arange(f, device=q.device) < fcnt[:, None, None]
    # per cluster, its members that are fixed tokens anyway (appended ones have label -1):
    # a cluster adds only its other members to the candidates
    lab = clusters.labels[:, :, :n].gather(-1, fixed)
    in_cluster = fixed_live & (lab >= 0)
    dump = torch.where(in_cluster, lab, torch.full_like(lab, c))  # column c: a dump
    fixed_in = torch.zeros(b, hkv, c + 1, dtype=torch.int64, device=q.device).scatter_add_(
        -1, dump, torch.ones_like(dump))[..., :c]
    size_r = clusters.sizes.gather(-1, order)  # sizes in rank order
    new_r = size_r - fixed_in.gather(-1, order)  # members that are not fixed tokens
    room = (budget - fcnt).clamp(min=0)[:, None, None]  # cluster tokens wanted
    before = torch.cumsum(new_r, -1) - new_r  # new tokens of the better-ranked clusters
    take = torch.where((before < room) & (new_r > 0), size_r, torch.zeros_like(size_r))
    # sum(take) < room + one cluster + the fixed tokens inside the chosen clusters
    cap = max(1, min(n, budget + max(size_bound, clusters.max_size)))
    tok, tcnt, _ = ops.cluster_tokens(order, take, clusters.offsets, clusters.members, cap,
                                      with_ranks=False)
    # fixed tokens that no chosen cluster holds
    chosen = torch.zeros_like(take, dtype=torch.bool).scatter_(-1, order, take > 0)
    covered = in_cluster & chosen.gather(-1, lab.clamp(min=0))
    extra = fixed_live & ~covered
    m = cap + f
    out = torch.zeros(b, hkv, m + 1, dtype=torch.int64, device=q.device)  # column m: a dump
    live = torch.arange(cap, device=q.device) < tcnt[..., None]
    out[..., :cap] = torch.where(live, tok, torch.zeros_like(tok))  # unspecified past tcnt
    slot = torch.where(extra, tcnt[..., None] + torch.cumsum(extra, -1) - 1,
                       torch.full_like(fixed, m))
    out.scatter_(-1, slot, fixed)
    return out[..., :m], tcnt + extra.sum(-1)


def select(q: Tensor, k: Tensor, state: TwilightState, span: KeySpan, cfg: TwilightConfig,
           scale: float) -> Selection:
    """Base candidates, then the union of per-head nucleus sets over estimated weights."""
    n, hkv = k.shape[2], k.shape[1]
    if cfg.p >= 1.0:
        return Selection.everything(span, hkv)
    budget = resolve_budget(cfg.base_budget, n)
    keys = state.keys
    if cfg.base == "dense" or budget >= n:  # every valid key is a candidate: no index list
        est = ops.int4_estimates(q, keys.codes, keys.scale, keys.zero, scale, span=span)
        kept, kcnt = ops.topp_select_estimates(est, cfg.p, sink=cfg.sink, window=cfg.window)
        return Selection(kept, kcnt, span.lengths[:, None].expand(-1, hkv))
    if cfg.base == "cluster":
        cand, ccnt = cluster_candidates(q, state.clusters, span, n, budget, cfg.sink,
                                        cfg.window, scale, state.cluster_bound)
    else:
        cand, ccnt = select_pages(q, state.pages, span, budget, cfg.sink, cfg.window, scale)
    est = ops.int4_estimates(q, keys.codes, keys.scale, keys.zero, scale, span=span,
                             indices=cand, counts=ccnt)
    kept, kcnt = ops.topp_select_estimates(est, cfg.p, sink=cfg.sink, window=cfg.window)
    return Selection(kept, kcnt, ccnt)


SPEC = MethodSpec("twilight", TwilightConfig, select, new_state)
