"""Tactic: key clusters ranked by their expected score, budget from a fitted score curve.

Zhu et al., "Tactic: Adaptive Sparse Attention with Clustering and Distribution Fitting
for Long-Context LLMs", 2025 (https://arxiv.org/abs/2502.12216).

At prefill the keys of each KV head are clustered (K-means, ~``cluster_size`` keys per
cluster); the ``outliers`` share of keys farthest from their centroid become clusters of
their own, and each cluster records its spread. At decode:

1. clusters are ranked by the group's largest log-softmax of ``q . c + |q|^2 sigma^2 / 2``
   (the log of a member's mean ``exp(q . k)`` for keys spread around ``c``), in bins of
   1/32 nat (:mod:`nucleus_attn.ops.tactic_select`): no sort;
2. the bins holding the top ``exact_fraction`` of the tokens are scored exactly, and so are
   the bins around two ranks (``sample_positions``, ``sample_tokens`` tokens each);
3. the attention weight of the token at rank x is modelled as ``y(x) = max(a / x + b, 0)``,
   fitted through the two segments' mean weights; its sum over ranks estimates the mass
   past the head;
4. each query head needs the shortest prefix of bins whose estimated mass, with the
   always-kept tokens, reaches ``p`` of the estimated total; the KV head keeps the longest
   prefix its query heads need.

Compared with the paper's defaults, the outlier clusters, the spread term and a larger
exact head (4% instead of 2%) and segments (64 tokens) make the estimate safe on the heads
where it undershot (retrieval heads whose needle sat in a low-ranked cluster; evidence and
commands in ``results/eval/tactic_fix_cpu.md``); ``outliers=0, spread_rank=False,
exact_fraction=0.02, sample_tokens=32`` is the paper's setting.

Tokens appended after clustering (decode tokens) are attended exactly. The cache is
clustered again once ``recluster_every`` of them have accumulated: automatically in eager
decoding; under CUDA-graph replay (no Python runs) the integration calls
:meth:`ClusterState.recluster` between replays (see there).
"""

from __future__ import annotations

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
)


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
        Fraction of the ranked tokens, from the top, scored exactly (default 0.04).
    sample_positions : tuple of float
        Relative ranks of the two segments that fit the score curve, in [0, 1) (default
        0.1, 0.6).
    sample_tokens : int
        Tokens per sampled segment, rounded up to whole score bins (default 64).
    outliers : float
        Share of the keys, farthest from their centroid, made singleton clusters at
        clustering (default 0.03; 0 disables). Costs centroid reads: C grows from
        ``N / cluster_size`` to ``N / cluster_size + outliers * N``.
    spread_rank : bool
        Rank clusters by ``q . c + |q|^2 sigma^2 / 2`` (default True) rather than ``q . c``.
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
    exact_fraction: float = 0.04
    sample_positions: tuple[float, float] = (0.1, 0.6)
    sample_tokens: int = 64
    outliers: float = 0.03
    spread_rank: bool = True
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
        if not 0.0 <= x1 < x2 < 1.0:
            raise ValueError(
                f"tactic: sample_positions={self.sample_positions} must be two increasing "
                "fractions in [0, 1), e.g. (0.1, 0.6)"
            )
        if isinstance(self.outliers, bool) or not 0.0 <= self.outliers < 1.0:
            raise ValueError(f"tactic: outliers={self.outliers!r} must be a fraction in "
                             "[0, 1), e.g. 0.03 (0 disables the singleton clusters)")
        if not isinstance(self.spread_rank, bool):
            raise ValueError(f"tactic: spread_rank={self.spread_rank!r} must be True or False")
        check_int(self.name, "sample_tokens", self.sample_tokens, 1)
        check_sink_window(self.name, self.sink, self.window)
        check_int(self.name, "recluster_every", self.recluster_every, 1)


@dataclass
class ClusterState:
    """One layer's clusters.

    ``centroids [B, Hkv, C, d]`` (in the keys' dtype), ``labels [B, Hkv, N]`` int64 (-1 =
    padding or appended after clustering), ``sizes [B, Hkv, C]`` int64, ``spread
    [B, Hkv, C]`` float32 (members' mean squared distance to the centroid per dimension),
    and the members of each cluster: ``members [B, Hkv, L]`` int32 positions grouped by
    cluster, the cluster ``c`` at ``offsets[c] : offsets[c] + sizes[c]``. Clusters
    ``C - ceil(outliers * N) ..`` are the singleton outliers.

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
    max_size: int  # a bound on the largest cluster: its size rounded up to a power of two
    ends: Tensor  # [B] span ends at clustering
    appended: int = 0  # tokens written into a static cache since clustering
    spread: Tensor | None = None  # [B, Hkv, C] float32
    room: int = 0  # positions of a static cache still unwritten at clustering (most of a row)
    #: host-side values no kernel reads (Twilight's cluster base keeps its own copy of
    #: the size bound): a request's fresh state copied into the previous one's buffers
    #: (compiled generation) takes them as they are
    HOST_COUNTERS: ClassVar[tuple[str, ...]] = ("appended", "max_size")

    @staticmethod
    def build(k: Tensor, span: KeySpan, cfg: TacticConfig) -> ClusterState:
        """Cluster the valid keys (K-means, outlier singletons, spreads, member lists)."""
        cents, labels, sizes = ops.kmeans(k, span, cfg.cluster_size, cfg.iterations, cfg.segment)
        cents, labels, sizes = ops.split_outliers(k, cents, labels, sizes, cfg.outliers)
        spread = ops.cluster_spread(k, cents, labels, sizes)
        c = sizes.shape[-1]
        # members in cluster order (padding, label -1, after every cluster)
        key = torch.where(labels >= 0, labels, torch.full_like(labels, c))
        members = torch.argsort(key, dim=-1, stable=True).to(torch.int32)
        offsets = torch.cumsum(sizes, -1) - sizes
        # one host sync, at prefill: the largest cluster, and the positions a static
        # cache can still write (0 in a growing cache, whose every sequence ends at N)
        most = torch.stack([sizes.amax() if sizes.numel() else sizes.new_zeros(()),
                            (k.shape[2] - span.ends).amax()])
        largest, room = (int(x) for x in most.tolist())
        # rounded up, so that the next request's clusters usually give the same bound: its
        # metadata then fits the buffers that recorded CUDA graphs read (hf._copy_into)
        max_size = 1 << max(0, largest - 1).bit_length()
        return ClusterState(cfg, cents.to(k.dtype), labels, sizes, k.shape[2], k.shape[2],
                            members, offsets, max_size, span.ends.clone(), spread=spread,
                            room=room)

    def recluster(self, k: Tensor, span: KeySpan) -> None:
        """Cluster the whole cache again, now; the appended tokens join the clusters.

        The tensors are updated in place when their shapes allow it (a static cache: N,
        and so C, stay fixed), so a decode step captured in a CUDA graph keeps reading the
        right clusters on replay. Replays run no Python, so nothing counts the decode
        tokens there: call this between replays at least once every ``recluster_every``
        steps (eager decoding does it by itself in :meth:`extend` / :meth:`refresh`).
        If it is not called, nothing is lost: in a static cache the always-kept list has
        room for every position still unwritten at clustering (:meth:`unclustered`), so
        every decode token stays attended exactly; only the clusters do not take them in.

        One host sync (the largest cluster size), outside the captured step.
        """
        fresh = ClusterState.build(k, span, self.cfg)
        for name in ("centroids", "labels", "sizes", "members", "offsets", "spread", "ends"):
            old, new = getattr(self, name), getattr(fresh, name)
            if old is not None and old.shape == new.shape and old.dtype == new.dtype:
                old.copy_(new)
            else:
                setattr(self, name, new)
        self.max_size, self.room = fresh.max_size, fresh.room
        self.n = max(self.n, k.shape[2])
        self.clustered, self.appended = k.shape[2], 0

    def extend(self, k: Tensor, span: KeySpan) -> None:
        n = k.shape[2]
        if n <= self.n:
            return
        if n - self.clustered >= self.cfg.recluster_every:
            self.recluster(k, span)
        else:
            self.labels = grow(self.labels, n)
            self.labels[:, :, self.n:n] = -1
        self.n = n

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        """Mark each sequence's newest key as unclustered (attended exactly); cluster again
        after ``recluster_every`` of them (a host-side count: under CUDA-graph replay, which
        runs no Python, call :meth:`recluster` between replays instead)."""
        self.appended += 1
        if self.appended >= self.cfg.recluster_every:
            self.recluster(k, span)
            return
        h = self.labels.shape[1]
        self.labels.scatter_(2, last_index(span, h), -1)

    def unclustered(self) -> int:
        """A bound on the tokens appended since clustering, per sequence: exact in a growing
        cache; in a static cache every position still unwritten at clustering, so that a
        step captured in a CUDA graph attends every decode token on replay, however many
        replays run without :meth:`recluster` (replays run no Python to count them)."""
        return self.room if self.room else self.n - self.clustered

    def fixed_capacity(self) -> int:
        """Always-kept tokens listed at most: the sink, the window and the unclustered."""
        return self.cfg.sink + max(self.cfg.window, self.unclustered())


def new_state(k: Tensor, span: KeySpan, cfg: TacticConfig) -> ClusterState:
    return ClusterState.build(k, span, cfg)


def select(q: Tensor, k: Tensor, state: ClusterState, span: KeySpan, cfg: TacticConfig,
           scale: float) -> Selection:
    """Shortest prefix of ranked clusters whose estimated mass reaches p (see module doc).

    Four ops (:mod:`nucleus_attn.ops.tactic_select`), five Triton launches plus one memset
    on a GPU, no host sync: the kept positions are the always-kept tokens outside the
    kept clusters, then the kept clusters' members (any order).
    """
    hkv, n = k.shape[1], k.shape[2]
    if cfg.p >= 1.0:
        return Selection.everything(span, hkv)
    spread = state.spread if cfg.spread_rank else None
    rank = ops.rank_clusters(q, state.centroids, state.sizes, spread, scale,
                             head_fraction=cfg.exact_fraction,
                             sample_positions=cfg.sample_positions,
                             sample_tokens=cfg.sample_tokens)
    cap = state.fixed_capacity()
    labels = state.labels[:, :, :n]
    masses = ops.cluster_lse(q, k, rank, state.members, state.offsets, state.sizes, labels,
                             span, state.ends, cfg.sink, cfg.window, cap, scale)
    prefix, kept, counts = ops.tactic_cut(masses, rank, cfg.p, labels, span, state.ends,
                                          cfg.sink, cfg.window, cap)
    ops.append_clusters(kept, counts, state.members, state.offsets, state.sizes, rank.bins,
                        prefix)
    return Selection(kept, counts, span.lengths[:, None].expand(-1, hkv))


SPEC = MethodSpec("tactic", TacticConfig, select, new_state)
