"""Tactic: key clusters ranked by q.centroid, budget from a fitted distribution of scores.

Zhu et al., "Tactic: Adaptive Sparse Attention with Clustering and Distribution Fitting
for Long-Context LLMs", 2025 (https://arxiv.org/abs/2502.12216).

At prefill the keys of each KV head are clustered (K-means, ~``cluster_size`` keys per
cluster). At decode:

1. clusters are ranked by q.centroid (the group's maximum log-softmax);
2. the top clusters holding ``exact_fraction`` of the tokens are scored exactly, and so are
   two short segments of the ranking around ``sample_positions`` (10% and 60%);
3. the attention weight of the token at rank x of the ranking is modelled as
   ``y(x) = max(a / x + b, 0)``, fitted through the two segments' mean weights; its sum
   over a cluster's rank range estimates the cluster's mass (closed form with harmonic
   numbers), exact sums replace it for the exactly scored top clusters;
4. each query head needs the shortest prefix of ranked clusters whose estimated mass,
   with the always-kept tokens, reaches ``p`` of the estimated total; the KV head keeps the
   longest prefix its query heads need.

Tokens appended after clustering (decode tokens) are attended exactly; the cache is
re-clustered once ``recluster_every`` such tokens have accumulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import ops
from ..span import KeySpan
from .base import (
    MethodConfig,
    MethodSpec,
    Selection,
    check_int,
    check_p,
    check_sink_window,
    grow,
    last_index,
    sink_window_positions,
)

EULER_GAMMA = 0.5772156649015329


@dataclass(frozen=True)
class TacticConfig(MethodConfig):
    """Clustering + distribution fitting.

    Parameters
    ----------
    p : float
        Estimated attention mass to keep, in (0, 1] (default 0.9); ``p=1`` is dense.
    cluster_size : int
        Average keys per cluster (default 16).
    iterations : int
        K-means iterations at prefill (default 10).
    segment : int
        Positions clustered together (default 4096); see :func:`nucleus_attn.ops.kmeans`.
    exact_fraction : float
        Fraction of the ranked tokens, from the top, scored exactly (default 0.02).
    sample_positions : tuple of float
        Relative ranks of the two segments that fit the score curve (default 0.1, 0.6).
    sample_tokens : int
        Tokens per sampled segment, rounded to whole clusters (default 32).
    sink, window : int
        Tokens always kept at the start / end (default 4 / 64).
    recluster_every : int
        Decode tokens after which the cache is clustered again (default 2048).
    """

    name: ClassVar[str] = "tactic"
    p: float = 0.9
    cluster_size: int = 16
    iterations: int = 10
    segment: int = 4096
    exact_fraction: float = 0.02
    sample_positions: tuple[float, float] = (0.1, 0.6)
    sample_tokens: int = 32
    sink: int = 4
    window: int = 64
    recluster_every: int = 2048

    def __post_init__(self) -> None:
        check_p(self.name, self.p)
        check_int(self.name, "cluster_size", self.cluster_size, 1)
        check_int(self.name, "iterations", self.iterations, 1)
        check_int(self.name, "segment", self.segment, self.cluster_size)
        if not 0.0 < self.exact_fraction <= 1.0:
            raise ValueError(f"tactic: exact_fraction={self.exact_fraction} must be in (0, 1]")
        x1, x2 = self.sample_positions
        if not 0.0 <= x1 < x2 <= 1.0:
            raise ValueError(
                f"tactic: sample_positions={self.sample_positions} must be two increasing "
                "fractions in [0, 1], e.g. (0.1, 0.6)"
            )
        check_int(self.name, "sample_tokens", self.sample_tokens, 1)
        check_sink_window(self.name, self.sink, self.window)
        check_int(self.name, "recluster_every", self.recluster_every, 1)


@dataclass
class ClusterState:
    """One layer's clusters: centroids ``[B, Hkv, C, d]`` (in the keys' dtype), labels
    ``[B, Hkv, N]`` (-1 = padding or appended after clustering), sizes ``[B, Hkv, C]``, and
    the members of each cluster: ``members [B, Hkv, L]`` int32 positions grouped by
    cluster, the cluster ``c`` at ``offsets[c] : offsets[c] + sizes[c]``.

    In a growing cache the positions ``[clustered, n)`` are the tokens appended since
    clustering. In a static cache N stays fixed: ``ends`` (``[B]``, each sequence's end at
    clustering) marks where the appended tokens start, and ``appended`` counts them."""

    cfg: TacticConfig
    centroids: Tensor
    labels: Tensor
    sizes: Tensor
    n: int  # tokens covered
    clustered: int  # positions [0, clustered) were clustered
    members: Tensor
    offsets: Tensor
    max_size: int  # largest cluster (bounds the number of exactly scored tokens)
    ends: Tensor  # [B] span ends at clustering
    appended: int = 0  # tokens written into a static cache since clustering

    @staticmethod
    def build(k: Tensor, span: KeySpan, cfg: TacticConfig) -> ClusterState:
        cents, labels, sizes = ops.kmeans(k, span, cfg.cluster_size, cfg.iterations, cfg.segment)
        c = sizes.shape[-1]
        # members in cluster order (padding, label -1, after every cluster)
        key = torch.where(labels >= 0, labels, torch.full_like(labels, c))
        members = torch.argsort(key, dim=-1, stable=True).to(torch.int32)
        offsets = torch.cumsum(sizes, -1) - sizes
        max_size = int(sizes.max()) if sizes.numel() else 0  # one host sync, at prefill
        return ClusterState(cfg, cents.to(k.dtype), labels, sizes, k.shape[2], k.shape[2],
                            members, offsets, max_size, span.ends.clone())

    def _recluster(self, k: Tensor, span: KeySpan) -> None:
        fresh = ClusterState.build(k, span, self.cfg)
        for name in ("centroids", "labels", "sizes", "members", "offsets", "max_size", "ends"):
            setattr(self, name, getattr(fresh, name))
        self.clustered, self.appended = k.shape[2], 0

    def extend(self, k: Tensor, span: KeySpan) -> None:
        n = k.shape[2]
        if n <= self.n:
            return
        if n - self.clustered >= self.cfg.recluster_every:
            self._recluster(k, span)
        else:
            self.labels = grow(self.labels, n)
            self.labels[:, :, self.n:n] = -1
        self.n = n

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        """Mark each sequence's newest key as unclustered (attended exactly); cluster again
        after ``recluster_every`` of them (a host-side count: under CUDA-graph replay, which
        runs no Python, capture again before that many steps)."""
        self.appended += 1
        if self.appended >= self.cfg.recluster_every:
            self._recluster(k, span)
            return
        h = self.labels.shape[1]
        self.labels.scatter_(2, last_index(span, h), -1)

    def unclustered(self) -> int:
        """A bound on the tokens appended since clustering, per sequence: exact in a growing
        cache; in a static cache the most there can be before re-clustering, so that a
        captured step stays valid on replay."""
        return self.cfg.recluster_every if self.appended else self.n - self.clustered


def new_state(k: Tensor, span: KeySpan, cfg: TacticConfig) -> ClusterState:
    return ClusterState.build(k, span, cfg)


def harmonic(x: Tensor) -> Tensor:
    """H(x) = sum_{t=1}^{x} 1/t, extended to real x >= 0 (H(0) = 0)."""
    return torch.special.digamma(x + 1.0) + EULER_GAMMA


def curve_sum(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``sum_{t=1}^{x} max(a/t + b, 0)`` for a >= 0 (the fitted weights of ranks 1..x)."""
    # a/t + b is decreasing in t; with b < 0 it crosses zero at t0 = a / -b.
    t0 = torch.where(b < 0, a / (-b).clamp(min=1e-30), torch.full_like(a, float("inf")))
    xe = torch.minimum(x, torch.floor(t0).clamp(min=0))
    return a * harmonic(xe) + b * xe


def select(q: Tensor, k: Tensor, state: ClusterState, span: KeySpan, cfg: TacticConfig,
           scale: float) -> Selection:
    """Shortest prefix of ranked clusters whose estimated mass reaches p (see module doc).

    Everything after the centroid scores works per cluster or on the few exactly scored
    tokens; the tokens of chosen clusters come from the members lists (no per-token pass
    over the cache). Kept positions are listed cluster by cluster, then the fixed tokens.
    """
    b, hq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    if cfg.p >= 1.0:
        return Selection.everything(span, hkv)
    c = state.sizes.shape[-1]
    dev = q.device

    def per_q(x: Tensor) -> Tensor:  # [B, Hkv, ...] -> [B, Hq, ...]
        return x.repeat_interleave(g, dim=1)

    # 1. rank clusters per KV head
    cs = ops.centroid_scores(q, state.centroids, state.sizes, scale)
    order = torch.argsort(ops.group_logsoftmax_max(cs, hkv), dim=-1, descending=True)
    ranks = torch.arange(c, device=dev)
    size_r = state.sizes.gather(-1, order)  # sizes in rank order
    cum = torch.cumsum(size_r.float(), -1)  # tokens through rank j
    before = cum - size_r
    total = cum[..., -1:]  # clustered valid tokens

    # 2. tokens scored exactly: head clusters, two sampled segments, always-kept tokens
    head_tokens = torch.ceil(cfg.exact_fraction * total).clamp(min=1)
    n_head = (before < head_tokens).sum(-1, keepdim=True)  # clusters in the head
    in_head = ranks < n_head  # by rank
    segs = []
    for frac in cfg.sample_positions:
        x0 = torch.floor(frac * total)
        segs.append((cum > x0) & (before < x0 + cfg.sample_tokens))  # rank range overlaps
    take = torch.where(in_head | segs[0] | segs[1], size_r, torch.zeros_like(size_r))
    # head <= head_tokens + one cluster, a segment <= sample_tokens + two clusters
    cap = min(n, math.ceil(cfg.exact_fraction * n) + 2 * cfg.sample_tokens
              + 5 * state.max_size + 1)
    tok, tcnt, trank = ops.cluster_tokens(order, take, state.offsets, state.members, cap)
    fixed, fcnt = sink_window_positions(span, n, cfg.sink, cfg.window, state.ends,
                                        state.unclustered())
    fixed = fixed[:, None, :].expand(b, hkv, -1)
    fcnt = fcnt[:, None].expand(b, hkv)
    lt = ops.gathered_scores(q, k, tok, tcnt, scale)  # [B, Hq, S]
    lf = ops.gathered_scores(q, k, fixed, fcnt, scale)  # [B, Hq, F]
    m = torch.maximum(lt.amax(-1, keepdim=True), lf.amax(-1, keepdim=True))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wt, wf = torch.exp(lt - m), torch.exp(lf - m)  # exp(l - max), 0 past the counts
    live = torch.arange(cap, device=dev) < tcnt[..., None]
    trank = torch.where(live, trank, torch.zeros_like(trank))  # unspecified past the counts
    tok_fixed = span.forced(tok, cfg.sink, cfg.window) & live  # sink/window among members
    e_fixed = wf.sum(-1, keepdim=True)  # [B, Hq, 1]

    # 3. fit y = a/x + b through the two segments' mean weights at their mean ranks
    ys, xs = [], []
    for s in segs:
        in_s = per_q(s.gather(-1, trank) & live)
        ntok = in_s.sum(-1, keepdim=True).clamp(min=1)
        ys.append((wt * in_s).sum(-1, keepdim=True) / ntok)
        lo = torch.where(s, before, torch.full_like(before, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(s, cum, torch.zeros_like(cum)).amax(-1, keepdim=True)
        xs.append(per_q(((lo + hi) / 2 + 0.5).clamp(min=1)))
    (y1, y2), (x1, x2) = ys, xs
    a = ((y1 - y2) / (1 / x1 - 1 / x2).clamp(min=1e-12)).clamp(min=0)
    bb = torch.where(a > 0, y1 - a / x1, (y1 + y2) / 2)

    # 4. estimated mass per ranked cluster: exact in the head, fitted curve elsewhere
    # (each cluster's slots are contiguous in the scored list: per-cluster sums are
    # differences of a float64 prefix sum, without atomics)
    head_slot = per_q(in_head.gather(-1, trank) & live & ~tok_fixed)
    prefix_w = torch.nn.functional.pad(
        torch.cumsum(torch.where(head_slot, wt, torch.zeros_like(wt)).double(), -1), (1, 0))
    end = torch.cumsum(take, -1).clamp(max=cap)
    exact = (prefix_w.gather(-1, per_q(end)) - prefix_w.gather(-1, per_q(end - take))).float()
    fitted = curve_sum(a, bb, per_q(cum)) - curve_sum(a, bb, per_q(before))
    est = torch.where(per_q(in_head), exact, fitted)
    mass_before = e_fixed + torch.cumsum(est, -1) - est  # mass kept without cluster j
    z = e_fixed + est.sum(-1, keepdim=True)
    need = (mass_before < cfg.p * z).sum(-1)  # clusters each query head needs
    prefix = need.view(b, hkv, g).amax(-1, keepdim=True)

    # 5. keep every member of the first `prefix` clusters, and the fixed tokens that are not
    # among them (appended ones, or sink/window tokens of later clusters)
    take = torch.where(ranks < prefix, size_r, torch.zeros_like(size_r))
    kept, kcnt, _ = ops.cluster_tokens(order, take, state.offsets, state.members, n + 1,
                                       with_ranks=False)
    rank_of = torch.empty_like(order).scatter_(-1, order, ranks.expand_as(order))
    lab = state.labels[:, :, :n].gather(-1, fixed)
    covered = (lab >= 0) & (rank_of.gather(-1, lab.clamp(min=0)) < prefix)
    extra = (torch.arange(fixed.shape[-1], device=dev) < fcnt[..., None]) & ~covered
    slot = torch.where(extra, kcnt[..., None] + torch.cumsum(extra, -1) - 1,
                       torch.full_like(fixed, n))  # column n is a dump for the others
    kept.scatter_(-1, slot, fixed)
    return Selection(kept[..., :n], kcnt + extra.sum(-1), span.lengths[:, None].expand(-1, hkv))


SPEC = MethodSpec("tactic", TacticConfig, select, new_state)
