"""Tactic's decode-time selection: rank clusters by a score threshold, score a few exactly,
fit the score curve, cut, and list the kept positions, without sorting and without a host
sync.

The ranking is a histogram, not a sort. Each cluster's score (the group's largest
log-softmax of ``q . c`` plus the spread correction, at most 0) is quantised into one of
:data:`RANK_BINS` bins of ``1 / BINS_PER_NAT`` nats, best first; clusters in one bin are
tied. The bins' token counts give each bin's range of token ranks, which is all the
method needs: the exactly scored head is the bins that start before
``ceil(exact_fraction * tokens)``, a sampled segment is the bins that overlap ranks
``[x0, x0 + sample_tokens)``, and the kept prefix is a number of bins. Four ops, each a
torch reference (the specification) beside its Triton kernels:

1. :func:`rank_clusters`: cluster scores, bins, the bins' rank ranges and the plan (head
   and segment bins); kernels: scores with per-block softmax statistics, then bins with a
   token-weighted histogram whose last program writes the plan.
2. :func:`cluster_lse`: the exact log-mass ``log sum exp(scale q . k)`` of every head and
   segment cluster per query head (sink, window and appended tokens apart), read from the
   member lists, and of the always-kept tokens; one kernel.
3. :func:`tactic_cut`: per query head the fit ``y = a / x + b`` through the segments, the
   estimated mass of every prefix of bins and the shortest one reaching ``p``; the KV head
   keeps the longest its query heads need; the always-kept tokens outside it open the kept
   list. One kernel (a program per query head, the last of a group finishes it).
4. :func:`append_clusters`: the members of the kept clusters appended to that list in
   cluster order, straight into the layout :func:`~nucleus_attn.ops.sparse_attention`
   reads; two launches (chunk totals, then the copy).

With the memset of its counters, a selection is eight launches (seven with
:data:`LSE_TWO_PASS` off). The list of sampled
clusters is filled by atomics, in unspecified order; the cut only sums over it, in fixed
point, so its result does not depend on that order, and the kept list is written in a
fixed order: a step gives bitwise the same output every time it runs (CUDA-graph replays
included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..span import KeySpan
from ._dispatch import (
    cdiv,
    dot_block,
    dot_in_f32,
    kernel,
    last_dim_dense,
    next_pow2,
    row_strides,
    tl,
    use_triton,
)
from .clusters import centroid_scores_reference
from .select import compact, group_logsoftmax_max

#: Bins of the cluster ranking (scores below ``-RANK_BINS / BINS_PER_NAT`` share the last).
RANK_BINS = 2048
#: Resolution of the ranking: clusters whose scores differ by less are tied.
BINS_PER_NAT = 32
#: Always-kept tokens scored per block (their log-masses come in blocks).
FIXED_BLOCK = 64
#: Layout of :attr:`ClusterRanking.plan`.
PLAN_HEAD, PLAN_SEG1_LO, PLAN_SEG1_HI, PLAN_SEG2_LO, PLAN_SEG2_HI, PLAN_X1, PLAN_X2 = range(7)
PLAN_SIZE = 8
EULER_GAMMA = 0.5772156649015329
# per-row int32 counters after the histogram in the zeroed scratch of the Triton path
_TICKET_BINS, _COUNT_LIST, _PREFIX, _TICKET_CUT = range(RANK_BINS, RANK_BINS + 4)
_SCRATCH = RANK_BINS + 8


@dataclass(frozen=True)
class ClusterRanking:
    """Where each cluster ranks, in bins (see the module docstring).

    Attributes
    ----------
    bins : Tensor
        ``[B, Hkv, C]`` int32 bin of each cluster (0 = best).
    starts : Tensor
        ``[B, Hkv, RANK_BINS + 1]`` int32 tokens in the bins before each bin: bin ``j``
        holds ranks ``[starts[j], starts[j + 1])``; ``starts[-1]`` is the clustered total.
    plan : Tensor
        ``[B, Hkv, PLAN_SIZE]`` int32: the head's bin count (the head is the bins below
        it), each segment's first and last bin (empty when first > last) and nominal
        start rank ``x0``.
    scratch : Tensor or None
        Zeroed counters for the downstream kernels (Triton path only), each consumer's
        taken once (see :func:`_scratch`).
    """

    bins: Tensor
    starts: Tensor
    plan: Tensor
    scratch: Tensor | None = None
    _taken: set[str] = field(default_factory=set, repr=False, compare=False)


@dataclass(frozen=True)
class ClusterMasses:
    """Exact log-masses of the sampled clusters and of the always-kept tokens.

    Attributes
    ----------
    ids : Tensor
        ``[B, Hkv, C]`` int32 sampled clusters, the first ``count`` live (any order).
    bins : Tensor
        ``[B, Hkv, C]`` int32 their bins.
    tokens : Tensor
        ``[B, Hkv, C]`` int32 their members that are not always kept.
    lse : Tensor
        ``[B, Hq, C]`` float32 ``log sum exp(scale q . k)`` over those members (-inf if
        none).
    count : Tensor
        ``[B, Hkv]`` int32.
    fixed_lse : Tensor
        ``[B, Hq, J]`` float32 the same over the always-kept tokens, by blocks of
        :data:`FIXED_BLOCK` (their log-sum-exp over J is the total; -inf for empty blocks).
    """

    ids: Tensor
    bins: Tensor
    tokens: Tensor
    lse: Tensor
    count: Tensor
    fixed_lse: Tensor


# --- shared definitions ------------------------------------------------------------------

def harmonic(x: Tensor) -> Tensor:
    """``H(x) = sum_{t=1}^{x} 1/t`` for integer-valued float32 ``x >= 0``: exact sums below
    16, the asymptotic series above (error < 1e-10); the kernels use the same formula."""
    x = x.float()
    small = torch.zeros_like(x)
    for t in range(1, 16):
        small = small + torch.where(x >= t, 1.0 / t, 0.0)
    big = x.clamp(min=16.0)
    inv = 1.0 / big
    series = torch.log(big) + EULER_GAMMA + 0.5 * inv - inv * inv / 12 + inv**4 / 120
    return torch.where(x < 16, small, series)


def curve_sum(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``sum_{t=1}^{x} max(a/t + b, 0)`` for ``a >= 0`` and integer-valued ``x`` (the fitted
    weights of ranks 1..x)."""
    # a/t + b is decreasing in t; with b < 0 it crosses zero at t0 = a / -b.
    t0 = torch.where(b < 0, a / (-b).clamp(min=1e-30), torch.full_like(a, float("inf")))
    xe = torch.minimum(x.float(), torch.floor(t0).clamp(min=0))
    return a * harmonic(xe) + b * xe


def fixed_positions(span: KeySpan, since: Tensor, sink: int, window: int,
                    capacity: int) -> tuple[Tensor, Tensor]:
    """The always-kept tokens: the sink, the recent window and every token from ``since``.

    Parameters
    ----------
    span : KeySpan
        Valid keys.
    since : Tensor
        ``[B]`` first position not clustered (each sequence's end at clustering).
    sink, window : int
        Tokens always kept at the start / end.
    capacity : int
        Positions listed at most (>= sink + window); past it the newest are kept.

    Returns
    -------
    positions : Tensor
        ``[B, capacity]`` int64 ascending, the first ``count`` live (0 after).
    count : Tensor
        ``[B]`` int64.
    """
    s, e = span.starts, span.ends
    a = torch.maximum(s, torch.minimum(e - window, since.to(e.dtype)))
    n_sink = (torch.minimum(s + sink, a) - s).clamp(min=0)
    a = torch.maximum(a, e - (capacity - n_sink))  # over capacity: the newest tokens
    count = n_sink + (e - a)
    j = torch.arange(capacity, device=s.device)[None, :]
    pos = torch.where(j < n_sink[:, None], s[:, None] + j, a[:, None] + j - n_sink[:, None])
    return torch.where(j < count[:, None], pos, torch.zeros_like(pos)), count


def sampled_mask(ranking: ClusterRanking, sizes: Tensor) -> Tensor:
    """``[B, Hkv, C]`` bool: the clusters scored exactly (head and segment bins)."""
    plan = ranking.plan.long()
    b = ranking.bins.long()

    def within(lo: int, hi: int) -> Tensor:
        return (b >= plan[..., lo:lo + 1]) & (b <= plan[..., hi:hi + 1])

    head = b < plan[..., PLAN_HEAD:PLAN_HEAD + 1]
    return (sizes > 0) & (head | within(PLAN_SEG1_LO, PLAN_SEG1_HI)
                          | within(PLAN_SEG2_LO, PLAN_SEG2_HI))


def _check_rows(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape[:len(shape)]) != shape:
        raise ValueError(f"{name} must start with dims {shape}, got {tuple(t.shape)}")


# --- 1. ranking --------------------------------------------------------------------------

def rank_clusters_reference(
    q: Tensor, centroids: Tensor, sizes: Tensor, spread: Tensor | None, scale: float,
    head_fraction: float, sample_positions: tuple[float, float], sample_tokens: int,
) -> ClusterRanking:
    """Bins of the clusters, their rank ranges, and the head and segment bins.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    centroids : Tensor
        ``[B, Hkv, C, d]``.
    sizes : Tensor
        ``[B, Hkv, C]`` int64 members (0 = empty slot, never ranked).
    spread : Tensor or None
        ``[B, Hkv, C]`` float32 members' mean squared distance to the centroid per
        dimension; the score adds ``scale^2 |q|^2 spread / 2`` (None: ``q . c`` alone).
    scale : float
        Softmax scale.
    head_fraction : float
        Tokens, from the top, scored exactly (as a fraction of the clustered tokens).
    sample_positions : tuple of float
        Relative ranks ``x0 / tokens`` of the two sampled segments, in [0, 1).
    sample_tokens : int
        Tokens per segment (whole bins are taken: at least this many).
    """
    b, hq, _ = q.shape
    hkv, c = centroids.shape[1], centroids.shape[2]
    # reads: C * d centroid values per KV head, once for the group
    s = centroid_scores_reference(q, centroids, sizes, scale)
    if spread is not None:
        qn2 = (q.float() * q.float()).sum(-1)  # [B, Hq]
        corr = 0.5 * scale * scale * qn2.view(b, hkv, hq // hkv, 1) * spread[:, :, None, :]
        s = s + corr.reshape(b, hq, c)
    agg = group_logsoftmax_max(s, hkv)  # [B, Hkv, C], <= 0
    q_bins = torch.floor(-agg * BINS_PER_NAT).clamp(0, RANK_BINS - 1)
    live = (sizes > 0) & torch.isfinite(agg)
    bins = torch.where(live, q_bins, torch.full_like(q_bins, RANK_BINS - 1)).to(torch.int32)
    hist = torch.zeros(b, hkv, RANK_BINS, dtype=torch.int64, device=q.device)
    hist.scatter_add_(-1, bins.long(), torch.where(live, sizes, torch.zeros_like(sizes)))
    cum = torch.cumsum(hist, -1)
    starts = F.pad(cum, (1, 0))  # [B, Hkv, NB + 1]
    total = cum[..., -1:].float()
    head_tokens = torch.ceil(head_fraction * total).clamp(min=1)
    plan = torch.zeros(b, hkv, PLAN_SIZE, dtype=torch.int64, device=q.device)
    plan[..., PLAN_HEAD] = (starts[..., :-1] < head_tokens).sum(-1)
    for i, frac in enumerate(sample_positions):
        x0 = torch.floor(frac * total)
        plan[..., PLAN_SEG1_LO + 2 * i] = (starts[..., 1:] <= x0).sum(-1)  # first bin past x0
        plan[..., PLAN_SEG1_HI + 2 * i] = (starts[..., :-1] < x0 + sample_tokens).sum(-1) - 1
        plan[..., PLAN_X1 + i] = x0[..., 0].long()
    return ClusterRanking(bins, starts.to(torch.int32), plan.to(torch.int32))


@kernel
def _rank_scores_kernel(
    q_ptr, cent_ptr, sizes_ptr, spread_ptr, s_ptr, pm_ptr, pl_ptr,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_cc, HKV, C, D, NCH, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, SPREAD: tl.constexpr,
):
    # one program per (sequence, KV head, BLOCK_C clusters): the group's scores, and per
    # query head the block's max and sum of exp (its share of the log-softmax normaliser)
    row = tl.program_id(0)
    ch = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    offs_c = ch * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    ct = tl.load(cent_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
                 + offs_c[:, None].to(tl.int64) * stride_cc + offs_d[None, :],
                 mask=mc[:, None] & md[None, :], other=0.0)
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    qt = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * GROUP + g)[:, None] * stride_qh
                 + offs_d[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    if DOT_F32:
        s = tl.dot(qt.to(tl.float32), tl.trans(ct.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(qt, tl.trans(ct.to(qt.dtype)))
    s = s * scale
    if SPREAD:  # + scale^2 |q|^2 spread / 2: the log of a member's mean weight
        qf = qt.to(tl.float32)
        qn2 = tl.sum(qf * qf, axis=1)
        sp = tl.load(spread_ptr + row.to(tl.int64) * C + offs_c, mask=mc, other=0.0)
        s = s + (0.5 * scale * scale) * qn2[:, None] * sp[None, :]
    size = tl.load(sizes_ptr + row.to(tl.int64) * C + offs_c, mask=mc, other=0)
    s = tl.where(((size > 0) & mc)[None, :], s, float("-inf"))
    hrow = row.to(tl.int64) * GROUP + g  # = b * Hq + query head
    tl.store(s_ptr + hrow[:, None] * C + offs_c[None, :], s, mask=mg[:, None] & mc[None, :])
    m = tl.max(s, axis=1)
    ms = tl.where(m > float("-inf"), m, 0.0)
    lsum = tl.sum(tl.exp(s - ms[:, None]), axis=1)
    tl.store(pm_ptr + hrow * NCH + ch, m, mask=mg)
    tl.store(pl_ptr + hrow * NCH + ch, lsum, mask=mg)


@kernel
def _rank_bins_kernel(
    s_ptr, pm_ptr, pl_ptr, sizes_ptr, bins_ptr, scratch_ptr, starts_ptr, plan_ptr,
    C, NCH, NP, head_fraction, frac1, frac2, T,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_NCH: tl.constexpr,
    BLOCK: tl.constexpr, NB: tl.constexpr, R: tl.constexpr, SCRATCH: tl.constexpr,
):
    # one program per (sequence, KV head, BLOCK clusters): log-softmax normalisers from the
    # blocks' statistics, the group's best log-softmax per cluster, its bin, and the bin's
    # token count by atomics; the row's last program turns the histogram into rank ranges
    # and the plan (head bins, segment bins)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    hrow = row.to(tl.int64) * GROUP + g
    ch = tl.arange(0, BLOCK_NCH)
    mch = ch < NCH
    pm = tl.load(pm_ptr + hrow[:, None] * NCH + ch[None, :], mask=mg[:, None] & mch[None, :],
                 other=float("-inf"))
    pl = tl.load(pl_ptr + hrow[:, None] * NCH + ch[None, :], mask=mg[:, None] & mch[None, :],
                 other=0.0)
    big = tl.max(pm, axis=1)
    bs = tl.where(big > float("-inf"), big, 0.0)
    tot = tl.sum(pl * tl.exp(pm - bs[:, None]), axis=1)
    # log-softmax normaliser; +inf where the query head scores no cluster at all
    lse = tl.where(tot > 0, bs + tl.log(tl.maximum(tot, 1e-30)), float("inf"))
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mc = offs < C
    st = tl.load(s_ptr + hrow[:, None] * C + offs[None, :], mask=mg[:, None] & mc[None, :],
                 other=float("-inf"))
    agg = tl.max(tl.where(mg[:, None], st - lse[:, None], float("-inf")), axis=0)
    size = tl.load(sizes_ptr + row.to(tl.int64) * C + offs, mask=mc, other=0).to(tl.int32)
    live = mc & (size > 0) & (agg > float("-inf"))
    qb = tl.minimum(tl.maximum(tl.floor(-agg * R), 0.0), NB - 1.0)
    bins = tl.where(live, qb.to(tl.int32), NB - 1)
    tl.store(bins_ptr + row.to(tl.int64) * C + offs, bins, mask=mc)
    srow = scratch_ptr + row.to(tl.int64) * SCRATCH
    tl.atomic_add(srow + bins, size, mask=live)
    tl.debug_barrier()  # every thread's histogram atomics before the ticket
    ticket = tl.atomic_add(srow + NB, 1)  # acq_rel: the last one sees every program's counts
    if ticket == NP - 1:
        j = tl.arange(0, NB)
        hist = tl.load(srow + j, cache_modifier=".cg")
        cum = tl.cumsum(hist, axis=0)
        before = cum - hist
        total = tl.sum(hist, axis=0)
        sbase = starts_ptr + row.to(tl.int64) * (NB + 1)
        tl.store(sbase + j, before)
        tl.store(sbase + NB, total)
        tf = total.to(tl.float32)
        ht = tl.maximum(tl.ceil(head_fraction * tf), 1.0)
        hb = tl.sum((before.to(tl.float32) < ht).to(tl.int32), axis=0)
        x1 = tl.floor(frac1 * tf)
        x2 = tl.floor(frac2 * tf)
        lo1 = tl.sum((cum.to(tl.float32) <= x1).to(tl.int32), axis=0)
        hi1 = tl.sum((before.to(tl.float32) < x1 + T).to(tl.int32), axis=0) - 1
        lo2 = tl.sum((cum.to(tl.float32) <= x2).to(tl.int32), axis=0)
        hi2 = tl.sum((before.to(tl.float32) < x2 + T).to(tl.int32), axis=0) - 1
        k = tl.arange(0, 8)
        plan = tl.where(k == 0, hb, tl.where(k == 1, lo1, tl.where(k == 2, hi1, tl.where(
            k == 3, lo2, tl.where(k == 4, hi2, tl.where(k == 5, x1.to(tl.int32), tl.where(
                k == 6, x2.to(tl.int32), 0)))))))
        tl.store(plan_ptr + row.to(tl.int64) * 8 + k, plan)


def rank_clusters_triton(
    q: Tensor, centroids: Tensor, sizes: Tensor, spread: Tensor | None, scale: float,
    head_fraction: float, sample_positions: tuple[float, float], sample_tokens: int,
) -> ClusterRanking:
    """Triton version of :func:`rank_clusters_reference` (two launches and a memset; the
    result also carries the zeroed counters of the downstream kernels)."""
    q, centroids = last_dim_dense(q), last_dim_dense(centroids)
    sizes = sizes.contiguous()
    b, hq, d = q.shape
    hkv, c = centroids.shape[1], centroids.shape[2]
    g = hq // hkv
    rows = b * hkv
    dev = q.device
    block_d = max(16, next_pow2(d))
    block_c = max(16, min(128, 8192 // block_d, next_pow2(c)))
    nch = cdiv(c, block_c)
    s = torch.empty(b * hq, c, dtype=torch.float32, device=dev)
    pm = torch.empty(b * hq, nch, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    f32 = dot_in_f32(q, centroids)
    sp = spread.contiguous() if spread is not None else s  # (unused without spread)
    _rank_scores_kernel[(rows, nch)](
        q, centroids, sizes, sp, s, pm, pl, q.stride(0), q.stride(1), *row_strides(centroids),
        hkv, c, d, nch, float(scale), GROUP=g, BLOCK_G=dot_block(g), BLOCK_C=block_c,
        BLOCK_D=block_d, DOT_F32=f32, SPREAD=spread is not None, num_warps=8 if f32 else 4,
    )
    scratch = torch.zeros(rows, _SCRATCH, dtype=torch.int32, device=dev)
    bins = torch.empty(b, hkv, c, dtype=torch.int32, device=dev)
    starts = torch.empty(b, hkv, RANK_BINS + 1, dtype=torch.int32, device=dev)
    plan = torch.empty(b, hkv, PLAN_SIZE, dtype=torch.int32, device=dev)
    block = max(16, min(1024, next_pow2(c)))
    np_ = cdiv(c, block)
    _rank_bins_kernel[(rows, np_)](
        s, pm, pl, sizes, bins, scratch, starts, plan, c, nch, np_, float(head_fraction),
        float(sample_positions[0]), float(sample_positions[1]), float(sample_tokens),
        GROUP=g, BLOCK_G=next_pow2(g), BLOCK_NCH=next_pow2(nch), BLOCK=block, NB=RANK_BINS,
        R=float(BINS_PER_NAT), SCRATCH=_SCRATCH, num_warps=4,
    )
    return ClusterRanking(bins, starts, plan, scratch)


def rank_clusters(
    q: Tensor, centroids: Tensor, sizes: Tensor, spread: Tensor | None, scale: float, *,
    head_fraction: float, sample_positions: tuple[float, float], sample_tokens: int,
    impl: str = "auto",
) -> ClusterRanking:
    """Rank clusters into score bins; see :func:`rank_clusters_reference`."""
    b, hq, d = q.shape
    if centroids.dim() != 4 or centroids.shape[0] != b or centroids.shape[-1] != d or (
            hq % centroids.shape[1]):
        raise ValueError(f"centroids must be [B={b}, Hkv, C, d={d}] with Hkv dividing Hq={hq}, "
                         f"got {tuple(centroids.shape)}")
    _check_rows("sizes", sizes, tuple(centroids.shape[:3]))
    if spread is not None:
        _check_rows("spread", spread, tuple(centroids.shape[:3]))
    x1, x2 = sample_positions
    if not (0.0 < head_fraction <= 1.0 and 0.0 <= x1 < x2 < 1.0 and sample_tokens >= 1):
        raise ValueError(f"head_fraction={head_fraction} must be in (0, 1], "
                         f"sample_positions={sample_positions} increasing in [0, 1), "
                         f"sample_tokens={sample_tokens} >= 1")
    if use_triton(impl, q, centroids, sizes):
        return rank_clusters_triton(q, centroids, sizes, spread, scale, head_fraction,
                                    sample_positions, sample_tokens)
    return rank_clusters_reference(q, centroids, sizes, spread, scale, head_fraction,
                                   sample_positions, sample_tokens)


# --- 2. exact log-masses -----------------------------------------------------------------

def cluster_lse_reference(
    q: Tensor, k: Tensor, ranking: ClusterRanking, members: Tensor, offsets: Tensor,
    sizes: Tensor, labels: Tensor, span: KeySpan, since: Tensor, sink: int, window: int,
    fixed_capacity: int, scale: float,
) -> ClusterMasses:
    """Exact log-masses of the head and segment clusters and of the always-kept tokens.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    k : Tensor
        ``[B, Hkv, N, d]``.
    ranking : ClusterRanking
        From :func:`rank_clusters`.
    members, offsets, sizes, labels : Tensor
        The clustering: ``[B, Hkv, L]`` int32 positions grouped by cluster, ``[B, Hkv, C]``
        int64 first slot and count of each cluster's members, ``[B, Hkv, >= N]`` int64
        cluster of each position (-1: not clustered).
    span : KeySpan
        Valid keys.
    since : Tensor
        ``[B]`` first position not clustered.
    sink, window, fixed_capacity : int
        The always-kept tokens (see :func:`fixed_positions`).
    scale : float
        Softmax scale.
    """
    b, hq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    c = sizes.shape[-1]
    dev = q.device
    every = torch.arange(c, device=dev).expand(b, hkv, c)
    ids, count = compact(every, sampled_mask(ranking, sizes))
    # the reference scores every key; the kernel reads only the members of sampled clusters
    qg = q.float().view(b, hkv, g, -1)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, k.float()) * scale
    lab = labels[:, :, :n]
    pos = span.positions().expand(b, n)
    member = (lab >= 0) & span.valid_mask()[:, None, :] & ~span.forced(pos, sink, window)[:, None]
    slot = torch.where(member, lab, torch.full_like(lab, c))[:, :, None, :].expand(b, hkv, g, n)
    neg = torch.full((b, hkv, g, c + 1), float("-inf"), device=dev)
    lmax = neg.scatter_reduce(-1, slot, torch.where(member[:, :, None], logits, neg[..., :1]),
                              "amax")
    shift = torch.where(torch.isfinite(lmax), lmax, torch.zeros_like(lmax))
    w = torch.where(member[:, :, None], torch.exp(logits - shift.gather(-1, slot)), 0.0)
    tot = torch.zeros_like(lmax).scatter_add_(-1, slot, w)
    lse_c = (shift + torch.log(tot))[..., :c]  # -inf where no member
    ntok = torch.zeros(b, hkv, c + 1, dtype=torch.int64, device=dev).scatter_add_(
        -1, slot[:, :, 0], member.long())[..., :c]
    live = torch.arange(c, device=dev) < count[..., None]
    idx = ids.clamp(max=c - 1) if c else ids
    lse = torch.where(live[:, :, None], lse_c.gather(-1, idx[:, :, None].expand(b, hkv, g, c)),
                      float("-inf")).view(b, hq, c)
    tokens = torch.where(live, ntok.gather(-1, idx), 0)
    bins = torch.where(live, ranking.bins.long().gather(-1, idx), 0)
    # always-kept tokens, by blocks
    fpos, fcnt = fixed_positions(span, since, sink, window, fixed_capacity)
    blocks = math.ceil(fixed_capacity / FIXED_BLOCK)
    fpos = F.pad(fpos, (0, blocks * FIXED_BLOCK - fixed_capacity))
    fl = torch.einsum("bhgd,bhmd->bhgm", q.float().view(b, hkv, g, -1),
                      k.float().gather(2, fpos[:, None, :, None].expand(b, hkv, -1, k.shape[-1])))
    flive = torch.arange(fpos.shape[-1], device=dev) < fcnt[:, None]
    fl = torch.where(flive[:, None, None, :], fl * scale, float("-inf"))
    fixed_lse = torch.logsumexp(fl.view(b, hkv, g, blocks, FIXED_BLOCK), -1).view(b, hq, blocks)
    return ClusterMasses(ids.to(torch.int32), bins.to(torch.int32), tokens.to(torch.int32),
                         lse, count.to(torch.int32), fixed_lse)


@kernel
def _cluster_lse_kernel(
    q_ptr, k_ptr, members_ptr, offsets_ptr, sizes_ptr, bins_ptr, plan_ptr, s_ptr, e_ptr,
    since_ptr, ids_ptr, lbins_ptr, ntok_ptr, lse_ptr, scratch_ptr, flse_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
    HKV, C, LM, D, NCHUNK, FCAP, J, sink, window, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, CB: tl.constexpr, S: tl.constexpr,
    BLOCK_D: tl.constexpr, FB: tl.constexpr, DOT_F32: tl.constexpr, SCRATCH: tl.constexpr,
    COUNT: tl.constexpr, PHASE: tl.constexpr,
):
    # PHASE 0 (one launch): programs [0, NCHUNK) of a row take CB clusters each; the
    # sampled ones (head or segment bins) take list slots by an atomic, and their members'
    # keys, read from the member lists S lanes at a time, give an online log-sum-exp per
    # (query head, cluster). Programs NCHUNK.. : one block of FB always-kept tokens each.
    # PHASE 1 + 2 (two launches): phase 1 only fills the list (and the always-kept
    # blocks); phase 2's program i scores list entries [i*CB, i*CB + CB), so that every
    # lane holds a sampled cluster (in phase 0 a chunk of CB cluster ids holds about one:
    # most lanes idle while the program walks its longest cluster).
    row = tl.program_id(0)
    pid = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    qt = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * GROUP + g)[:, None] * stride_qh
                 + offs_d[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    if DOT_F32:
        qt = qt.to(tl.float32)
    kbase = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    hrow = row.to(tl.int64) * GROUP + g  # = b * Hq + query head
    s0 = tl.load(s_ptr + b)
    e0 = tl.load(e_ptr + b)
    if pid < NCHUNK:
        cbase = row.to(tl.int64) * C
        if PHASE == 2:
            listed = tl.load(scratch_ptr + row.to(tl.int64) * SCRATCH + COUNT)
            if pid * CB >= listed:
                return
            slot = pid * CB + tl.arange(0, CB)
            samp = slot < listed
            c = tl.load(ids_ptr + cbase + slot, mask=samp, other=0)
            size = tl.load(sizes_ptr + cbase + c, mask=samp, other=0).to(tl.int32)
        else:
            c = pid * CB + tl.arange(0, CB)
            mc = c < C
            size = tl.load(sizes_ptr + cbase + c, mask=mc, other=0).to(tl.int32)
            bn = tl.load(bins_ptr + cbase + c, mask=mc, other=0)
            pbase = plan_ptr + row.to(tl.int64) * 8
            hb = tl.load(pbase)
            in1 = (bn >= tl.load(pbase + 1)) & (bn <= tl.load(pbase + 2))
            in2 = (bn >= tl.load(pbase + 3)) & (bn <= tl.load(pbase + 4))
            samp = mc & (size > 0) & ((bn < hb) | in1 | in2)
            nsel = tl.sum(samp.to(tl.int32), axis=0)
            if nsel == 0:
                return
            base = tl.atomic_add(scratch_ptr + row.to(tl.int64) * SCRATCH + COUNT, nsel)
            slot = base + tl.cumsum(samp.to(tl.int32), axis=0) - 1
            tl.store(ids_ptr + cbase + slot, c, mask=samp)
            tl.store(lbins_ptr + cbase + slot, bn, mask=samp)
            if PHASE == 1:
                return
        off = tl.load(offsets_ptr + cbase + c, mask=samp, other=0)
        ssz = tl.where(samp, size, 0)
        longest = tl.max(ssz, axis=0)
        m_i = tl.full([BLOCK_G, CB], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_G, CB], tl.float32)
        nt = tl.zeros([CB], tl.int32)
        lane = tl.arange(0, S)
        l0 = 0
        while l0 < longest:
            ml = (l0 + lane)[None, :] < ssz[:, None]  # [CB, S]
            pos = tl.load(members_ptr + row.to(tl.int64) * LM + off[:, None] + l0 + lane[None, :],
                          mask=ml, other=0)
            ok = ml & (pos >= s0 + sink) & (pos < e0 - window)  # not always-kept
            nt += tl.sum(ok.to(tl.int32), axis=1)
            okf = tl.reshape(ok, [CB * S])
            posf = tl.reshape(pos, [CB * S]).to(tl.int64)
            kt = tl.load(kbase + posf[:, None] * stride_kn + offs_d[None, :],
                         mask=okf[:, None] & md[None, :], other=0.0)
            if DOT_F32:
                sc = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                sc = tl.dot(qt, tl.trans(kt.to(qt.dtype)))
            sc = tl.where(okf[None, :], sc * scale, float("-inf"))
            sc3 = tl.reshape(sc, [BLOCK_G, CB, S])
            m_new = tl.maximum(m_i, tl.max(sc3, axis=2))
            m_s = tl.where(m_new > float("-inf"), m_new, 0.0)
            acc = acc * tl.exp(m_i - m_s) + tl.sum(tl.exp(sc3 - m_s[:, :, None]), axis=2)
            m_i = m_new
            l0 += S
        lse = tl.where(acc > 0, m_i + tl.log(tl.maximum(acc, 1e-30)), float("-inf"))
        tl.store(lse_ptr + hrow[:, None] * C + slot[None, :], lse, mask=mg[:, None] & samp[None, :])
        tl.store(ntok_ptr + cbase + slot, nt, mask=samp)
    else:
        j = pid - NCHUNK
        since = tl.load(since_ptr + b)
        a = tl.maximum(s0, tl.minimum(e0 - window, since))
        n_sink = tl.maximum(tl.minimum(s0 + sink, a) - s0, 0)
        a = tl.maximum(a, e0 - (FCAP - n_sink))  # over capacity: the newest tokens
        count = n_sink + e0 - a
        t = j * FB + tl.arange(0, FB)
        live = (t < count) & (t < FCAP)
        pos = tl.where(t < n_sink, s0 + t, a + t - n_sink)
        kt = tl.load(kbase + pos[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                     mask=live[:, None] & md[None, :], other=0.0)
        if DOT_F32:
            sc = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            sc = tl.dot(qt, tl.trans(kt.to(qt.dtype)))
        sc = tl.where(live[None, :], sc * scale, float("-inf"))
        m = tl.max(sc, axis=1)
        ms = tl.where(m > float("-inf"), m, 0.0)
        ssum = tl.sum(tl.exp(sc - ms[:, None]), axis=1)
        lsum = ms + tl.log(tl.maximum(ssum, 1e-30))
        tl.store(flse_ptr + hrow * J + j, tl.where(ssum > 0, lsum, float("-inf")), mask=mg)


# clusters per program and member lanes per step of the log-mass kernel (a tile of 128 keys)
LSE_CLUSTERS, LSE_LANES = 16, 8
#: The log-mass kernel in two launches (fill the list of sampled clusters, then score it
#: with every lane busy) rather than one (see _cluster_lse_kernel).
LSE_TWO_PASS = True


def _scratch(ranking: ClusterRanking, rows: int, device: torch.device, user: str) -> Tensor:
    """The ranking's zeroed counters for one consumer (``"lse"``: the list slots;
    ``"cut"``: the prefix and the ticket), once per consumer. The consumer leaves them
    dirty, so a second call on the same ranking (a stage timed alone, a retry) gets fresh
    zeros: reused counters would send its atomics past the ends of its lists."""
    s = ranking.scratch
    if s is not None and s.shape[0] == rows and user not in ranking._taken:
        ranking._taken.add(user)
        return s
    return torch.zeros(rows, _SCRATCH, dtype=torch.int32, device=device)


def cluster_lse_triton(
    q: Tensor, k: Tensor, ranking: ClusterRanking, members: Tensor, offsets: Tensor,
    sizes: Tensor, span: KeySpan, since: Tensor, sink: int, window: int,
    fixed_capacity: int, scale: float,
) -> ClusterMasses:
    """Triton version of :func:`cluster_lse_reference` (two launches, or one with
    :data:`LSE_TWO_PASS` off): list entries past ``count`` are left unwritten, and the list
    is in the order the programs claimed it."""
    q, k = last_dim_dense(q), last_dim_dense(k)
    members, offsets, sizes = members.contiguous(), offsets.contiguous(), sizes.contiguous()
    b, hq, d = q.shape
    hkv, c = k.shape[1], sizes.shape[-1]
    g = hq // hkv
    rows = b * hkv
    dev = q.device
    scratch = _scratch(ranking, rows, dev, "lse")
    ids = torch.empty(b, hkv, c, dtype=torch.int32, device=dev)
    lbins = torch.empty_like(ids)
    ntok = torch.empty_like(ids)
    lse = torch.empty(b, hq, c, dtype=torch.float32, device=dev)
    blocks = cdiv(fixed_capacity, FIXED_BLOCK)
    fixed_lse = torch.empty(b, hq, blocks, dtype=torch.float32, device=dev)
    nchunk = cdiv(c, LSE_CLUSTERS)
    f32 = dot_in_f32(q, k)
    args = (q, k, members, offsets, sizes, ranking.bins, ranking.plan, span.starts, span.ends,
            since.to(span.ends.dtype), ids, lbins, ntok, lse, scratch, fixed_lse,
            q.stride(0), q.stride(1), *row_strides(k), hkv, c, members.shape[-1], d, nchunk,
            fixed_capacity, blocks, sink, window, float(scale))
    meta = dict(GROUP=g, BLOCK_G=dot_block(g), CB=LSE_CLUSTERS, S=LSE_LANES,
                BLOCK_D=max(16, next_pow2(d)), FB=FIXED_BLOCK, DOT_F32=f32, SCRATCH=_SCRATCH,
                COUNT=_COUNT_LIST, num_warps=8 if f32 else 4)
    if LSE_TWO_PASS:
        _cluster_lse_kernel[(rows, nchunk + blocks)](*args, PHASE=1, **meta)
        _cluster_lse_kernel[(rows, nchunk)](*args, PHASE=2, **meta)
    else:
        _cluster_lse_kernel[(rows, nchunk + blocks)](*args, PHASE=0, **meta)
    count = scratch[:, _COUNT_LIST].view(b, hkv)
    return ClusterMasses(ids, lbins, ntok, lse, count, fixed_lse)


def cluster_lse(
    q: Tensor, k: Tensor, ranking: ClusterRanking, members: Tensor, offsets: Tensor,
    sizes: Tensor, labels: Tensor, span: KeySpan, since: Tensor, sink: int, window: int,
    fixed_capacity: int, scale: float, *, impl: str = "auto",
) -> ClusterMasses:
    """Exact log-masses of sampled clusters; see :func:`cluster_lse_reference`."""
    b, hkv = k.shape[:2]
    for name, t in (("members", members), ("offsets", offsets), ("sizes", sizes),
                    ("labels", labels), ("ranking.bins", ranking.bins)):
        _check_rows(name, t, (b, hkv))
    if labels.shape[-1] < k.shape[2]:
        raise ValueError(f"labels {tuple(labels.shape)} must cover N={k.shape[2]} positions")
    if fixed_capacity < sink + window:
        raise ValueError(f"fixed_capacity={fixed_capacity} must be >= sink + window = "
                         f"{sink + window}")
    if use_triton(impl, q, k, members):
        return cluster_lse_triton(q, k, ranking, members, offsets, sizes, span, since, sink,
                                  window, fixed_capacity, scale)
    return cluster_lse_reference(q, k, ranking, members, offsets, sizes, labels, span, since,
                                 sink, window, fixed_capacity, scale)


# --- 3. the cut --------------------------------------------------------------------------

def fit_curve(y1: Tensor, y2: Tensor, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
    """``y = a / x + b`` through ``(x1, y1)`` and ``(x2, y2)``, with ``a >= 0`` (a flat line at
    the mean of the two when the second segment weighs more)."""
    a = ((y1 - y2) / (1 / x1 - 1 / x2).clamp(min=1e-12)).clamp(min=0)
    b = torch.where(a > 0, y1 - a / x1, (y1 + y2) / 2)
    return a, b


def tactic_cut_reference(
    masses: ClusterMasses, ranking: ClusterRanking, p: float, labels: Tensor, span: KeySpan,
    since: Tensor, sink: int, window: int, fixed_capacity: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kept prefix of bins, and the always-kept tokens outside it.

    Per query head, in units of ``exp(l - m)`` (``m`` the largest exact log-mass):
    ``e_fixed`` the always-kept tokens' mass, ``E_c`` each sampled cluster's; the
    segments' mean weight per token ``y_s`` at their mean rank ``x_s`` fit
    ``y = a / x + b``, whose sum over ranks ``F`` (:func:`curve_sum`) estimates the mass
    past the head. The estimated mass of the first ``P`` bins is

        mass(P) = e_fixed + sum_{head c, bin_c < P} E_c + F(max(starts[P], h)) - F(h)

    with ``h = starts[head bins]``; the estimated total is ``z = mass(RANK_BINS)``; the query
    head needs the smallest ``P`` with ``mass(P) >= p z``, and the KV head keeps the
    largest ``P`` of its group.

    Parameters
    ----------
    masses : ClusterMasses
        From :func:`cluster_lse`.
    ranking : ClusterRanking
        From :func:`rank_clusters`.
    p : float
        Mass to keep, in (0, 1).
    labels : Tensor
        ``[B, Hkv, >= N]`` int64 cluster of each position (-1: not clustered).
    span, since, sink, window, fixed_capacity
        The always-kept tokens (see :func:`fixed_positions`).

    Returns
    -------
    prefix : Tensor
        ``[B, Hkv]`` int32 bins kept: a cluster is kept when ``bin < prefix``.
    indices : Tensor
        ``[B, Hkv, N]`` int64: the always-kept tokens not in a kept cluster, first
        ``counts``; :func:`append_clusters` appends the kept clusters' members.
    counts : Tensor
        ``[B, Hkv]`` int64.
    """
    b, hq, c = masses.lse.shape
    hkv = ranking.bins.shape[1]
    g = hq // hkv
    n = span.n
    nb = RANK_BINS

    def per_q(x: Tensor) -> Tensor:  # [B, Hkv, ...] -> [B, Hq, ...]
        return x.repeat_interleave(g, dim=1)

    live = per_q(torch.arange(c, device=labels.device) < masses.count[..., None].long())
    lse = torch.where(live, masses.lse, float("-inf"))
    m = torch.maximum(lse.amax(-1), masses.fixed_lse.amax(-1))[..., None]  # [B, Hq, 1]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lse - m)  # 0 past count
    e_fixed = torch.exp(masses.fixed_lse - m).sum(-1, keepdim=True)
    plan = per_q(ranking.plan.long())
    starts = per_q(ranking.starts.long()).float()  # [B, Hq, NB + 1]
    bins = per_q(masses.bins.long())
    ntok = per_q(masses.tokens.long()).float()
    hb = plan[..., PLAN_HEAD:PLAN_HEAD + 1]
    head = bins < hb
    ebin = torch.zeros(b, hq, nb, device=e.device).scatter_add_(-1, bins.clamp(0, nb - 1),
                                                                torch.where(head, e, 0.0))
    ys, xs = [], []
    for i in range(2):
        lo = plan[..., PLAN_SEG1_LO + 2 * i:PLAN_SEG1_LO + 2 * i + 1]
        hi = plan[..., PLAN_SEG1_HI + 2 * i:PLAN_SEG1_HI + 2 * i + 1]
        seg = (bins >= lo) & (bins <= hi)
        ys.append(torch.where(seg, e, 0.0).sum(-1, keepdim=True)
                  / torch.where(seg, ntok, 0.0).sum(-1, keepdim=True).clamp(min=1))
        x_lo = starts.gather(-1, lo.clamp(0, nb))
        x_hi = starts.gather(-1, (hi + 1).clamp(0, nb))
        x0 = plan[..., PLAN_X1 + i:PLAN_X1 + i + 1].float()
        xs.append(torch.where(lo <= hi, (x_lo + x_hi) / 2 + 0.5, x0 + 0.5).clamp(min=1))
    a, bb = fit_curve(ys[0], ys[1], xs[0], xs[1])
    h = starts.gather(-1, hb)  # rank where the head ends
    tail = curve_sum(a, bb, torch.maximum(starts, h)) - curve_sum(a, bb, h)  # [B, Hq, NB+1]
    mass = e_fixed + F.pad(torch.cumsum(ebin, -1), (1, 0)) + tail
    z = mass[..., -1:]
    need = (mass[..., :nb] < p * z).sum(-1)  # [B, Hq]
    prefix = need.view(b, hkv, g).amax(-1).to(torch.int32)
    # the always-kept tokens that no kept cluster covers open the kept list
    fpos, fcnt = fixed_positions(span, since, sink, window, fixed_capacity)
    fpos = fpos[:, None, :].expand(b, hkv, -1)
    lab = labels.gather(-1, fpos)
    bin_of = ranking.bins.long().gather(-1, lab.clamp(min=0))
    covered = (lab >= 0) & (bin_of < prefix[..., None].long())
    extra = (torch.arange(fixed_capacity, device=fpos.device) < fcnt[:, None, None]) & ~covered
    out, cnt = compact(fpos, extra, n)
    return prefix, out, cnt


@kernel
def _tactic_cut_kernel(
    lse_ptr, flse_ptr, lbins_ptr, ntok_ptr, cnt_ptr, stride_cnt_b, stride_cnt_h,
    plan_ptr, starts_ptr, scratch_ptr, labels_ptr, stride_lb, stride_lh, cbins_ptr,
    s_ptr, e_ptr, since_ptr, out_ptr, counts_ptr,
    HKV, C, J, M, FCAP, sink, window, p,
    GROUP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, NB: tl.constexpr,
    BLOCK_F: tl.constexpr, SCRATCH: tl.constexpr, PREFIX: tl.constexpr, TICKET: tl.constexpr,
    FIX: tl.constexpr,
):
    # one program per (sequence, query head): masses in units of exp(l - m), the fit
    # through the segments, the estimated mass of each prefix of bins and the shortest one
    # reaching p; the KV head's prefix is the group's largest (atomic max), and the
    # group's last program lists the always-kept tokens outside the kept clusters
    hrow = tl.program_id(0)
    b = hrow // (HKV * GROUP)
    h = (hrow % (HKV * GROUP)) // GROUP
    row = b * HKV + h
    cnt = tl.minimum(tl.load(cnt_ptr + b * stride_cnt_b + h * stride_cnt_h), C)
    pbase = plan_ptr + row.to(tl.int64) * 8
    hb = tl.load(pbase)
    lo1 = tl.load(pbase + 1)
    hi1 = tl.load(pbase + 2)
    lo2 = tl.load(pbase + 3)
    hi2 = tl.load(pbase + 4)
    sbase = starts_ptr + row.to(tl.int64) * (NB + 1)
    jj = tl.arange(0, BLOCK_J)
    fl = tl.load(flse_ptr + hrow.to(tl.int64) * J + jj, mask=jj < J, other=float("-inf"))
    lbase = lse_ptr + hrow.to(tl.int64) * C
    cbase = row.to(tl.int64) * C
    i = tl.arange(0, BLOCK_L)
    big = tl.max(fl, axis=0)
    i0 = 0
    while i0 < cnt:
        v = tl.load(lbase + i0 + i, mask=i0 + i < cnt, other=float("-inf"))
        big = tl.maximum(big, tl.max(v, axis=0))
        i0 += BLOCK_L
    ms = tl.where(big > float("-inf"), big, 0.0)
    # masses in [0, 1] units of exp(l - m) are summed as 40-bit fixed point in int64: sums
    # in any order are equal, so the cut does not depend on the order of the list (which
    # the programs of the previous kernel claimed by atomics)
    e_fixed = tl.sum((tl.exp(fl - ms) * FIX).to(tl.int64), axis=0)
    e_head = tl.sum(tl.zeros([2], tl.int64), axis=0)
    y1 = e_head
    y2 = e_head
    n1 = e_head
    n2 = e_head
    i0 = 0
    while i0 < cnt:
        mi = i0 + i < cnt
        e = (tl.exp(tl.load(lbase + i0 + i, mask=mi, other=float("-inf")) - ms) * FIX)
        e = e.to(tl.int64)
        bn = tl.load(lbins_ptr + cbase + i0 + i, mask=mi, other=NB)
        nt = tl.load(ntok_ptr + cbase + i0 + i, mask=mi, other=0).to(tl.int64)
        e_head += tl.sum(tl.where(bn < hb, e, 0), axis=0)
        s1 = (bn >= lo1) & (bn <= hi1)
        s2 = (bn >= lo2) & (bn <= hi2)
        y1 += tl.sum(tl.where(s1, e, 0), axis=0)
        n1 += tl.sum(tl.where(s1, nt, 0), axis=0)
        y2 += tl.sum(tl.where(s2, e, 0), axis=0)
        n2 += tl.sum(tl.where(s2, nt, 0), axis=0)
        i0 += BLOCK_L
    y1 = y1.to(tl.float32) / FIX / tl.maximum(n1, 1).to(tl.float32)
    y2 = y2.to(tl.float32) / FIX / tl.maximum(n2, 1).to(tl.float32)
    e_fixed_i = e_fixed
    e_fixed = e_fixed.to(tl.float32) / FIX
    e_head = e_head.to(tl.float32) / FIX
    x1 = tl.where(lo1 <= hi1, (tl.load(sbase + lo1) + tl.load(sbase + hi1 + 1)).to(tl.float32)
                  / 2 + 0.5, tl.load(pbase + 5).to(tl.float32) + 0.5)
    x2 = tl.where(lo2 <= hi2, (tl.load(sbase + lo2) + tl.load(sbase + hi2 + 1)).to(tl.float32)
                  / 2 + 0.5, tl.load(pbase + 6).to(tl.float32) + 0.5)
    x1 = tl.maximum(x1, 1.0)
    x2 = tl.maximum(x2, 1.0)
    fa = tl.maximum((y1 - y2) / tl.maximum(1.0 / x1 - 1.0 / x2, 1e-12), 0.0)
    fb = tl.where(fa > 0, y1 - fa / x1, (y1 + y2) / 2)
    t0 = tl.where(fb < 0, fa / tl.maximum(-fb, 1e-30), float("inf"))
    cap = tl.maximum(tl.floor(t0), 0.0)
    # F(x) = a H(min(x, t0)) + b min(x, t0) at the head's end h, the total, and each bin start
    hv = tl.where(tl.arange(0, 2) == 0, tl.load(sbase + hb), tl.load(sbase + NB)).to(tl.float32)
    xe = tl.minimum(hv, cap)
    small = tl.zeros([2], tl.float32)
    for t in tl.static_range(1, 16):
        small += tl.where(xe >= t, 1.0 / t, 0.0)
    bg = tl.maximum(xe, 16.0)
    inv = 1.0 / bg
    harm = tl.where(xe < 16, small,
                    tl.log(bg) + 0.5772156649015329 + 0.5 * inv - inv * inv / 12
                    + inv * inv * inv * inv / 120)
    fv = fa * harm + fb * xe
    f_head = tl.sum(tl.where(tl.arange(0, 2) == 0, fv, 0.0), axis=0)
    f_total = tl.sum(tl.where(tl.arange(0, 2) == 1, fv, 0.0), axis=0)
    target = p * (e_fixed + e_head + f_total - f_head)
    if e_fixed + e_head >= target:
        # the cut falls in the head: smallest P <= hb with e_fixed + sum_{bin < P} E >= target
        lo = 0
        hi = hb
        while lo < hi:
            mid = (lo + hi) // 2
            acc = e_fixed_i
            i0 = 0
            while i0 < cnt:
                mi = i0 + i < cnt
                e = (tl.exp(tl.load(lbase + i0 + i, mask=mi, other=float("-inf")) - ms) * FIX)
                bn = tl.load(lbins_ptr + cbase + i0 + i, mask=mi, other=NB)
                acc += tl.sum(tl.where(bn < mid, e.to(tl.int64), 0), axis=0)
                i0 += BLOCK_L
            if acc.to(tl.float32) / FIX >= target:
                hi = mid
            else:
                lo = mid + 1
        need = lo
    else:
        # past the head: the bins whose estimated prefix mass is still short of the target
        jb = tl.arange(0, NB)
        sx = tl.load(sbase + jb).to(tl.float32)
        xb = tl.minimum(tl.maximum(sx, tl.sum(tl.where(tl.arange(0, 2) == 0, hv, 0.0),
                                                axis=0)), cap)
        small_b = tl.zeros([NB], tl.float32)
        for t in tl.static_range(1, 16):
            small_b += tl.where(xb >= t, 1.0 / t, 0.0)
        bgb = tl.maximum(xb, 16.0)
        invb = 1.0 / bgb
        harm_b = tl.where(xb < 16, small_b,
                          tl.log(bgb) + 0.5772156649015329 + 0.5 * invb - invb * invb / 12
                          + invb * invb * invb * invb / 120)
        mass = e_fixed + e_head + (fa * harm_b + fb * xb) - f_head
        need = tl.sum(((mass < target) | (jb <= hb)).to(tl.int32), axis=0)
    srow = scratch_ptr + row.to(tl.int64) * SCRATCH
    tl.atomic_max(srow + PREFIX, need)
    tl.debug_barrier()
    ticket = tl.atomic_add(srow + TICKET, 1)
    if ticket == GROUP - 1:
        prefix = tl.atomic_max(srow + PREFIX, 0)  # the group's largest (read by an atomic)
        s0 = tl.load(s_ptr + b)
        e0 = tl.load(e_ptr + b)
        since = tl.load(since_ptr + b)
        a = tl.maximum(s0, tl.minimum(e0 - window, since))
        n_sink = tl.maximum(tl.minimum(s0 + sink, a) - s0, 0)
        a = tl.maximum(a, e0 - (FCAP - n_sink))
        count = n_sink + e0 - a
        written = 0
        tf = tl.arange(0, BLOCK_F)
        f0 = 0
        while f0 < count:
            live = (f0 + tf < count) & (f0 + tf < FCAP)
            pos = tl.where(f0 + tf < n_sink, s0 + f0 + tf, a + f0 + tf - n_sink)
            lab = tl.load(labels_ptr + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
                          + pos, mask=live, other=-1)
            kb = tl.load(cbins_ptr + cbase + lab, mask=live & (lab >= 0), other=NB)
            extra = live & ~((lab >= 0) & (kb < prefix))
            slot = written + tl.cumsum(extra.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + row.to(tl.int64) * M + slot, pos.to(tl.int64),
                     mask=extra & (slot < M))
            written += tl.sum(extra.to(tl.int32), axis=0)
            f0 += BLOCK_F
        tl.store(counts_ptr + row, written.to(tl.int64))


def tactic_cut_triton(
    masses: ClusterMasses, ranking: ClusterRanking, p: float, labels: Tensor, span: KeySpan,
    since: Tensor, sink: int, window: int, fixed_capacity: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of :func:`tactic_cut_reference` (one launch); ``indices`` past
    ``counts`` are left unwritten."""
    b, hq, c = masses.lse.shape
    hkv = ranking.bins.shape[1]
    g = hq // hkv
    rows = b * hkv
    n = span.n
    dev = masses.lse.device
    scratch = _scratch(ranking, rows, dev, "cut")
    if labels.stride(-1) != 1:
        labels = labels.contiguous()
    out = torch.empty(b, hkv, n, dtype=torch.int64, device=dev)
    counts = torch.empty(b, hkv, dtype=torch.int64, device=dev)
    cnt = masses.count
    lse, flse = masses.lse.contiguous(), masses.fixed_lse.contiguous()
    j = flse.shape[-1]
    _tactic_cut_kernel[(b * hq,)](
        lse, flse, masses.bins.contiguous(), masses.tokens.contiguous(), cnt, cnt.stride(0),
        cnt.stride(1), ranking.plan, ranking.starts, scratch, labels, labels.stride(0),
        labels.stride(1), ranking.bins, span.starts, span.ends, since.to(span.ends.dtype), out,
        counts, hkv, c, j, n, fixed_capacity, sink, window, float(p), GROUP=g,
        BLOCK_L=max(16, min(1024, next_pow2(c))), BLOCK_J=max(2, next_pow2(j)), NB=RANK_BINS,
        BLOCK_F=max(16, min(1024, next_pow2(fixed_capacity))), SCRATCH=_SCRATCH,
        PREFIX=_PREFIX, TICKET=_TICKET_CUT, FIX=float(2**40), num_warps=4,
    )
    prefix = scratch[:, _PREFIX].view(b, hkv)
    return prefix, out, counts


def tactic_cut(
    masses: ClusterMasses, ranking: ClusterRanking, p: float, labels: Tensor, span: KeySpan,
    since: Tensor, sink: int, window: int, fixed_capacity: int, *, impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Kept bins per KV head and the always-kept tokens outside them; see
    :func:`tactic_cut_reference`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1) here (p=1 is dense attention)")
    if use_triton(impl, masses.lse, labels):
        return tactic_cut_triton(masses, ranking, p, labels, span, since, sink, window,
                                 fixed_capacity)
    return tactic_cut_reference(masses, ranking, p, labels, span, since, sink, window,
                                fixed_capacity)


# --- 4. the kept list --------------------------------------------------------------------

def append_clusters_reference(
    indices: Tensor, counts: Tensor, members: Tensor, offsets: Tensor, sizes: Tensor,
    bins: Tensor, prefix: Tensor,
) -> tuple[Tensor, Tensor]:
    """Append the members of every cluster with ``bin < prefix`` to each row's list, in place.

    Parameters
    ----------
    indices : Tensor
        ``[B, Hkv, M]`` int64, the first ``counts`` live; must have room.
    counts : Tensor
        ``[B, Hkv]`` int64, increased by the members appended.
    members, offsets, sizes : Tensor
        ``[B, Hkv, L]`` int32 positions grouped by cluster, ``[B, Hkv, C]`` int64 each
        cluster's first slot and size.
    bins : Tensor
        ``[B, Hkv, C]`` int32 (:attr:`ClusterRanking.bins`).
    prefix : Tensor
        ``[B, Hkv]`` int32 from :func:`tactic_cut`.

    Returns
    -------
    indices, counts
        The same tensors.
    """
    b, h, c = sizes.shape
    m = indices.shape[-1]
    kept = (sizes > 0) & (bins.long() < prefix[..., None].long())
    # the cluster of each member slot: slots [offsets[c], offsets[c] + sizes[c]) are c's
    slot = torch.arange(members.shape[-1], device=sizes.device)
    ends = (offsets + sizes).contiguous()
    cl = torch.searchsorted(ends, slot.expand(b, h, -1).contiguous(), right=True)
    inside = cl < c
    cl = cl.clamp(max=max(c - 1, 0))
    take = inside & (slot >= offsets.gather(-1, cl)) & kept.gather(-1, cl)
    dest = counts[..., None] + torch.cumsum(take, -1) - 1
    dest = torch.where(take & (dest < m), dest, torch.full_like(dest, m))
    buf = F.pad(indices, (0, 1))
    buf.scatter_(-1, dest, members.to(torch.int64))
    indices.copy_(buf[..., :m])
    counts.add_(take.sum(-1))
    return indices, counts


@kernel
def _append_clusters_kernel(
    members_ptr, offsets_ptr, sizes_ptr, bins_ptr, prefix_ptr, stride_pb, stride_pj,
    out_ptr, counts_ptr, tot_ptr, HKV, C, LM, M, NCH,
    CB: tl.constexpr, S: tl.constexpr, BLOCK_CH: tl.constexpr, EMIT: tl.constexpr,
):
    # one program per (sequence, KV head, CB clusters). Pass 1 (EMIT=False): the chunk's
    # kept tokens into tot[row, 1 + chunk] (chunk 0 also copies the list's length to
    # tot[row, 0]). Pass 2: each chunk writes its kept clusters' members, S lanes at a
    # time, after the list and the chunks before it (a fixed order: the attention sums in
    # the same order at every replay), and chunk 0 writes the new length.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    c = chunk * CB + tl.arange(0, CB)
    mc = c < C
    cbase = row.to(tl.int64) * C
    prefix = tl.load(prefix_ptr + (row // HKV) * stride_pb + (row % HKV) * stride_pj)
    size = tl.load(sizes_ptr + cbase + c, mask=mc, other=0)
    bn = tl.load(bins_ptr + cbase + c, mask=mc, other=0)
    ks = tl.where(mc & (size > 0) & (bn < prefix), size, 0)
    tbase = tot_ptr + row.to(tl.int64) * (NCH + 1)
    if not EMIT:
        tl.store(tbase + 1 + chunk, tl.sum(ks, axis=0))
        if chunk == 0:
            tl.store(tbase, tl.load(counts_ptr + row))
    else:
        j = tl.arange(0, BLOCK_CH)
        tot = tl.load(tbase + j, mask=j <= NCH, other=0)
        if chunk == 0:
            tl.store(counts_ptr + row, tl.sum(tot, axis=0))
        base = tl.sum(tl.where(j <= chunk, tot, 0), axis=0)  # the list, then earlier chunks
        local = base + tl.cumsum(ks, axis=0) - ks
        off = tl.load(offsets_ptr + cbase + c, mask=ks > 0, other=0)
        longest = tl.max(ks, axis=0)
        lane = tl.arange(0, S)
        l0 = 0
        while l0 < longest:
            ml = (l0 + lane)[None, :] < ks[:, None]
            pos = tl.load(members_ptr + row.to(tl.int64) * LM + off[:, None] + l0
                          + lane[None, :], mask=ml, other=0)
            dst = local[:, None] + l0 + lane[None, :]
            tl.store(out_ptr + row.to(tl.int64) * M + dst, pos.to(tl.int64),
                     mask=ml & (dst < M))
            l0 += S


APPEND_CLUSTERS, APPEND_LANES = 64, 16  # clusters per program, member lanes per step


def append_clusters_triton(
    indices: Tensor, counts: Tensor, members: Tensor, offsets: Tensor, sizes: Tensor,
    bins: Tensor, prefix: Tensor,
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`append_clusters_reference` (two launches: chunk totals,
    then the copy), same order as the reference."""
    b, h, c = sizes.shape
    if not (indices.is_contiguous() and counts.is_contiguous()):
        raise ValueError("append_clusters: indices and counts must be contiguous (they are "
                         "updated in place)")
    members, offsets, sizes = members.contiguous(), offsets.contiguous(), sizes.contiguous()
    bins = bins.contiguous()
    nch = cdiv(c, APPEND_CLUSTERS)
    tot = torch.empty(b * h, nch + 1, dtype=torch.int64, device=sizes.device)
    for emit in (False, True):
        _append_clusters_kernel[(b * h, nch)](
            members, offsets, sizes, bins, prefix, prefix.stride(0), prefix.stride(1),
            indices, counts, tot, h, c, members.shape[-1], indices.shape[-1], nch,
            CB=APPEND_CLUSTERS, S=APPEND_LANES, BLOCK_CH=next_pow2(nch + 1), EMIT=emit,
            num_warps=4,
        )
    return indices, counts


def append_clusters(
    indices: Tensor, counts: Tensor, members: Tensor, offsets: Tensor, sizes: Tensor,
    bins: Tensor, prefix: Tensor, *, impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Append the kept clusters' members; see :func:`append_clusters_reference`."""
    b, h, c = sizes.shape
    for name, t in (("indices", indices), ("members", members), ("offsets", offsets),
                    ("bins", bins)):
        _check_rows(name, t, (b, h))
    if tuple(counts.shape) != (b, h) or tuple(prefix.shape) != (b, h):
        raise ValueError(f"counts {tuple(counts.shape)} and prefix {tuple(prefix.shape)} "
                         f"must be [B={b}, Hkv={h}]")
    if use_triton(impl, indices, members):
        return append_clusters_triton(indices, counts, members, offsets, sizes, bins, prefix)
    return append_clusters_reference(indices, counts, members, offsets, sizes, bins, prefix)
