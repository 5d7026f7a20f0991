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

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import ops
from ..span import KeySpan
from .base import MethodConfig, MethodSpec, Selection, check_int, check_p, grow

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
        check_int(self.name, "sink", self.sink, 0)
        check_int(self.name, "window", self.window, 0)
        check_int(self.name, "recluster_every", self.recluster_every, 1)


@dataclass
class ClusterState:
    """One layer's clusters: centroids ``[B, Hkv, C, d]``, labels ``[B, Hkv, N]`` (-1 =
    padding or appended after clustering), sizes ``[B, Hkv, C]``."""

    cfg: TacticConfig
    centroids: Tensor
    labels: Tensor
    sizes: Tensor
    n: int  # tokens covered
    clustered: int  # positions [0, clustered) were clustered

    @staticmethod
    def build(k: Tensor, span: KeySpan, cfg: TacticConfig) -> ClusterState:
        cents, labels, sizes = ops.kmeans(k, span, cfg.cluster_size, cfg.iterations, cfg.segment)
        return ClusterState(cfg, cents, labels, sizes, k.shape[2], k.shape[2])

    def extend(self, k: Tensor, span: KeySpan) -> None:
        n = k.shape[2]
        if n <= self.n:
            return
        if n - self.clustered >= self.cfg.recluster_every:
            fresh = ClusterState.build(k, span, self.cfg)
            self.centroids, self.labels, self.sizes = fresh.centroids, fresh.labels, fresh.sizes
            self.clustered = n
        else:
            self.labels = grow(self.labels, n)
            self.labels[:, :, self.n:n] = -1
        self.n = n


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
    """Shortest prefix of ranked clusters whose estimated mass reaches p (see module doc)."""
    b, hq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    if cfg.p >= 1.0:
        return Selection.everything(span, hkv)
    labels = state.labels[:, :, :n]
    c = state.sizes.shape[-1]
    dev = q.device

    # 1. rank clusters per KV head
    cs = ops.centroid_scores(q, state.centroids, state.sizes, scale)
    order = torch.argsort(ops.group_logsoftmax_max(cs, hkv), dim=-1, descending=True)
    ranks = torch.arange(c, device=dev).expand_as(order)
    rank_of = torch.empty_like(order).scatter_(-1, order, ranks)
    size_r = state.sizes.gather(-1, order).float()  # sizes in rank order
    cum = torch.cumsum(size_r, -1)  # tokens through rank j
    before = cum - size_r
    total = cum[..., -1:]  # clustered valid tokens
    tok_rank = torch.where(labels >= 0, rank_of.gather(-1, labels.clamp(min=0)),
                           torch.full_like(labels, c))

    # 2. tokens scored exactly: head clusters, two sampled segments, always-kept tokens
    head_tokens = torch.ceil(cfg.exact_fraction * total).clamp(min=1)
    n_head = (before < head_tokens).sum(-1, keepdim=True)  # clusters in the head
    segs = []
    for frac in cfg.sample_positions:
        x0 = torch.floor(frac * total)
        in_seg = (cum > x0) & (before < x0 + cfg.sample_tokens)  # rank range overlaps
        segs.append(in_seg)
    valid = span.valid_mask()[:, None, :]
    fixed = valid & ((labels < 0) | span.forced(span.positions().expand(b, -1), cfg.sink,
                                                 cfg.window)[:, None, :])
    in_head_tok = tok_rank < n_head
    seg_tok = [s.gather(-1, tok_rank.clamp(max=c - 1)) & (tok_rank < c) for s in segs]
    scored = fixed | in_head_tok | seg_tok[0] | seg_tok[1]
    idx, cnt = ops.mask_to_indices(scored)
    logits = ops.gathered_scores(q, k, idx, cnt, scale)  # [B, Hq, M]
    w = ops.topp_weights(logits)  # exp(l - max), 0 past counts
    live = torch.arange(idx.shape[-1], device=dev) < cnt[..., None]

    def per_token(x: Tensor) -> Tensor:  # [B, Hkv, N] -> [B, Hq, M] at the scored tokens
        return x.gather(-1, idx).repeat_interleave(g, dim=1) & live.repeat_interleave(g, dim=1)

    is_fixed, is_head = per_token(fixed), per_token(in_head_tok)
    rank_m = tok_rank.gather(-1, idx).repeat_interleave(g, dim=1)
    e_fixed = (w * is_fixed).sum(-1, keepdim=True)  # [B, Hq, 1]

    # 3. fit y = a/x + b through the two segments' mean weights at their mean ranks
    ys, xs = [], []
    for s, st in zip(segs, seg_tok, strict=True):
        tok = per_token(st)
        ntok = tok.sum(-1, keepdim=True).clamp(min=1)
        ys.append((w * tok).sum(-1, keepdim=True) / ntok)
        lo = torch.where(s, before, torch.full_like(before, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(s, cum, torch.zeros_like(cum)).amax(-1, keepdim=True)
        xs.append(((lo + hi) / 2 + 0.5).clamp(min=1).repeat_interleave(g, dim=1))
    (y1, y2), (x1, x2) = ys, xs
    a = ((y1 - y2) / (1 / x1 - 1 / x2).clamp(min=1e-12)).clamp(min=0)
    bb = torch.where(a > 0, y1 - a / x1, (y1 + y2) / 2)

    # 4. estimated mass per ranked cluster: exact in the head, fitted curve elsewhere
    head_bucket = torch.where(is_head & ~is_fixed, rank_m, torch.full_like(rank_m, c))
    exact = torch.zeros(b, hq, c + 1, device=dev).scatter_add_(-1, head_bucket, w)[..., :c]
    cum_q, before_q = cum.repeat_interleave(g, dim=1), before.repeat_interleave(g, dim=1)
    fitted = curve_sum(a, bb, cum_q) - curve_sum(a, bb, before_q)
    in_head_r = torch.arange(c, device=dev) < n_head.repeat_interleave(g, dim=1)
    est = torch.where(in_head_r, exact, fitted)
    mass_before = e_fixed + torch.cumsum(est, -1) - est  # mass kept without cluster j
    z = e_fixed + est.sum(-1, keepdim=True)
    need = (mass_before < cfg.p * z).sum(-1)  # clusters each query head needs
    prefix = need.view(b, hkv, g).amax(-1, keepdim=True)

    keep = fixed | (valid & (tok_rank < prefix))
    kept, kcnt = ops.mask_to_indices(keep)
    return Selection(kept, kcnt, span.lengths[:, None].expand(-1, hkv))


SPEC = MethodSpec("tactic", TacticConfig, select, new_state)
