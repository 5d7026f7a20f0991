"""Key clustering for Tactic: K-means per KV head, nearest-centroid assignment, centroid scores.

Keys are clustered once at prefill, per KV head, so that at decode the query is compared
with ~N/16 centroids instead of N keys. K-means runs on consecutive *segments* of the
cache (``segment`` positions each, ``segment / cluster_size`` clusters per segment):
this bounds the cost of an iteration at ``N * segment / cluster_size * d`` instead of
``N**2 / cluster_size * d`` at 128k tokens, and keeps the clustering of a prefix unchanged
when tokens are appended.
"""

from __future__ import annotations

import math

import torch
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

# --- nearest centroid --------------------------------------------------------------------

def assign_nearest_reference(keys: Tensor, centroids: Tensor, alive: Tensor) -> Tensor:
    """Index of the nearest live centroid (L2) of every key.

    Parameters
    ----------
    keys : Tensor
        ``[B, H, L, d]``.
    centroids : Tensor
        ``[B, H, C, d]`` float32.
    alive : Tensor
        ``[B, H, C]`` bool; dead centroids are never chosen.

    Returns
    -------
    Tensor
        ``[B, H, L]`` int64 (0 when no centroid is alive).
    """
    # argmin |k - c|^2 == argmax (k.c - |c|^2 / 2)
    score = torch.einsum("bhld,bhcd->bhlc", keys.float(), centroids)
    score = score - 0.5 * (centroids * centroids).sum(-1)[:, :, None, :]
    score = torch.where(alive[:, :, None, :], score, torch.full_like(score, float("-inf")))
    return score.argmax(-1)


@kernel
def _assign_nearest_kernel(
    keys_ptr, cent_ptr, alive_ptr, labels_ptr,
    stride_kb, stride_kh, stride_kl, stride_cb, stride_ch, stride_cc, H, L, C, D,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (sequence, head, BLOCK_L keys): scans every centroid in blocks,
    # keeping the running best score (k.c - |c|^2 / 2) and its first index
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ml = offs_l < L
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    kt = tl.load(keys_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                 + offs_l[:, None].to(tl.int64) * stride_kl + offs_d[None, :],
                 mask=ml[:, None] & md[None, :], other=0.0).to(tl.float32)
    cbase = cent_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    best = tl.full([BLOCK_L], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_L], tl.int32)
    c0 = 0
    while c0 < C:  # (a while loop: the 3.6 interpreter cannot run range(runtime int))
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        ct = tl.load(cbase + offs_c[:, None].to(tl.int64) * stride_cc + offs_d[None, :],
                     mask=mc[:, None] & md[None, :], other=0.0).to(tl.float32)
        alive = tl.load(alive_ptr + bh.to(tl.int64) * C + offs_c, mask=mc, other=0) != 0
        s = tl.dot(kt, tl.trans(ct), input_precision="tf32x3")
        s = s - 0.5 * tl.sum(ct * ct, axis=1)[None, :]
        s = tl.where((alive & mc)[None, :], s, float("-inf"))
        cmax = tl.max(s, axis=1)
        carg = tl.argmax(s, axis=1).to(tl.int32)
        better = cmax > best
        best = tl.where(better, cmax, best)
        arg = tl.where(better, carg + c0, arg)
        c0 += BLOCK_C
    tl.store(labels_ptr + bh.to(tl.int64) * L + offs_l, arg.to(tl.int64), mask=ml)


def assign_nearest_triton(keys: Tensor, centroids: Tensor, alive: Tensor) -> Tensor:
    """Triton version of :func:`assign_nearest_reference` (same contract). Products run on
    tensor cores as three tf32 passes (float32 accuracy); near-ties may resolve differently
    from the reference's summation order."""
    keys, centroids = last_dim_dense(keys), last_dim_dense(centroids)
    b, h, n, d = keys.shape
    c = centroids.shape[2]
    labels = torch.empty(b, h, n, dtype=torch.int64, device=keys.device)
    if n == 0:
        return labels
    alive = alive.to(torch.int8).contiguous()
    block_d = max(16, next_pow2(d))
    block_l = max(16, min(64, next_pow2(n)))
    block_c = max(16, min(64, next_pow2(c)))
    _assign_nearest_kernel[(b * h, cdiv(n, block_l))](
        keys, centroids, alive, labels, *row_strides(keys), *row_strides(centroids),
        h, n, c, d, BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=8,
    )
    return labels


def assign_nearest(keys: Tensor, centroids: Tensor, alive: Tensor, *, impl: str = "auto") -> Tensor:
    """Nearest-centroid labels; see :func:`assign_nearest_reference`."""
    if centroids.shape[:2] != keys.shape[:2] or centroids.shape[-1] != keys.shape[-1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} must be [B, H, C, d] matching "
                         f"keys {tuple(keys.shape)}")
    if alive.shape != centroids.shape[:3]:
        raise ValueError(f"alive {tuple(alive.shape)} must be [B, H, C] = "
                         f"{tuple(centroids.shape[:3])}")
    if use_triton(impl, keys, centroids):
        return assign_nearest_triton(keys, centroids, alive)
    return assign_nearest_reference(keys, centroids, alive)


# --- K-means -----------------------------------------------------------------------------

def kmeans(
    k: Tensor,
    span: KeySpan,
    cluster_size: int,
    iterations: int,
    segment: int,
    *,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Segment-local K-means of the valid keys of each KV head.

    Centroids start at evenly spaced valid keys of their segment (deterministic); each
    iteration assigns every key to its nearest centroid and moves centroids to the mean
    of their members (a centroid without members stays, with size 0).

    Parameters
    ----------
    k : Tensor
        ``[B, Hkv, N, d]``.
    span : KeySpan
        Valid positions; padding is never clustered (its label is -1).
    cluster_size : int
        Average tokens per cluster: a segment of L positions gets ``ceil(L / cluster_size)``.
    iterations : int
        Assign/update rounds, >= 1.
    segment : int
        Positions per independently clustered segment.

    Returns
    -------
    centroids : Tensor
        ``[B, Hkv, C, d]`` float32, ``C = ceil(N / segment) * ceil(segment / cluster_size)``.
    labels : Tensor
        ``[B, Hkv, N]`` int64 cluster of each position, -1 for padding.
    sizes : Tensor
        ``[B, Hkv, C]`` int64 members per cluster (0: unused slot).
    """
    b, h, n, d = k.shape
    per_seg = math.ceil(segment / cluster_size)
    n_seg = math.ceil(n / segment)
    cents = torch.zeros(b, h, n_seg * per_seg, d, dtype=torch.float32, device=k.device)
    sizes = torch.zeros(b, h, n_seg * per_seg, dtype=torch.int64, device=k.device)
    labels = torch.full((b, h, n), -1, dtype=torch.int64, device=k.device)
    valid = span.valid_mask()
    for s in range(n_seg):
        lo, hi = s * segment, min(n, (s + 1) * segment)
        c = math.ceil((hi - lo) / cluster_size)
        keys = k[:, :, lo:hi].float()
        vm = valid[:, lo:hi]
        nvalid = vm.sum(-1)
        first = vm.to(torch.int8).argmax(-1)
        # each sequence gets ceil(valid / cluster_size) clusters in this segment, so that
        # padding does not change how a sequence is clustered
        c_row = torch.div(nvalid + cluster_size - 1, cluster_size, rounding_mode="floor")
        j = torch.arange(c, device=k.device, dtype=torch.float32)
        pick = first[:, None] + ((j[None, :] + 0.5) * nvalid[:, None] / c_row.clamp(min=1)[:, None])
        pick = pick.long().clamp(max=hi - lo - 1)
        cent = keys.gather(2, pick[:, None, :, None].expand(b, h, c, d))
        alive = (j[None, :] < c_row[:, None])[:, None, :].expand(b, h, c)
        w = vm[:, None, :, None].float()
        for _ in range(iterations):
            lab = assign_nearest(keys, cent, alive, impl=impl)
            members = lab[..., None].expand_as(keys)
            sums = torch.zeros_like(cent).scatter_add_(2, members, keys * w)
            cnt = torch.zeros(b, h, c, device=k.device)
            cnt.scatter_add_(2, lab, w[..., 0].expand_as(lab))
            cent = torch.where(cnt[..., None] > 0, sums / cnt.clamp(min=1)[..., None], cent)
        base = s * per_seg
        cents[:, :, base:base + c] = cent
        sizes[:, :, base:base + c] = cnt.long()
        labels[:, :, lo:hi] = torch.where(vm[:, None, :], lab + base, torch.full_like(lab, -1))
    return cents, labels, sizes


def _residual_norms(k: Tensor, centroids: Tensor, labels: Tensor, chunk: int = 8192) -> Tensor:
    """``[B, H, N]`` float32 ``|k - centroid(label)|^2`` (0 where ``labels`` < 0), computed
    ``chunk`` positions at a time so that no ``[B, H, N, d]`` float32 copy is made."""
    b, h, n, d = k.shape
    out = torch.zeros(b, h, n, dtype=torch.float32, device=k.device)
    for lo in range(0, n, chunk):
        lab = labels[:, :, lo:lo + chunk]
        c = centroids.gather(2, lab.clamp(min=0)[..., None].expand(-1, -1, -1, d)).float()
        res = k[:, :, lo:lo + chunk].float() - c
        out[:, :, lo:lo + chunk] = torch.where(lab >= 0, (res * res).sum(-1), 0.0)
    return out


def split_outliers(
    k: Tensor, centroids: Tensor, labels: Tensor, sizes: Tensor, fraction: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Make the keys farthest from their centroid singleton clusters.

    A cluster's centroid stands for its members when clusters are ranked by ``q . c``; a
    key far from it (an attention sink, a needle among filler text) can have a large
    ``q . k`` while its cluster ranks low. As a cluster of its own its centroid is the key
    itself, so its score is exact. The clusters it left keep their other members, and
    their centroids move to the mean of those.

    Parameters
    ----------
    k : Tensor
        ``[B, H, N, d]`` keys.
    centroids, labels, sizes : Tensor
        A clustering of them as returned by :func:`kmeans` (``labels`` -1 = not clustered).
    fraction : float
        Share of each row's clustered keys split off: ``ceil(fraction * clustered)`` of
        them (so that padding does not change how a sequence is clustered), in
        ``ceil(fraction * N)`` new cluster slots (unused slots stay empty).

    Returns
    -------
    centroids, labels, sizes : Tensor
        ``[B, H, C + S, d]`` float32, ``[B, H, N]``, ``[B, H, C + S]`` int64 with
        ``S = ceil(fraction * N)``; the singletons are the clusters ``C ..``.
    """
    b, h, n, d = k.shape
    c = sizes.shape[-1]
    slots = min(n, math.ceil(fraction * n))
    if slots <= 0:
        return centroids, labels, sizes
    dist = torch.where(labels >= 0, _residual_norms(k, centroids, labels), -1.0)
    top = torch.topk(dist, slots, dim=-1).indices  # [B, H, slots], farthest first
    want = torch.ceil(fraction * (labels >= 0).sum(-1, keepdim=True).double()).clamp(max=slots)
    real = torch.arange(slots, device=k.device) < want  # the row's share, never padding
    new = c + torch.arange(slots, device=k.device).expand(b, h, slots)
    old = labels.gather(-1, top)
    labels = labels.scatter(-1, top, torch.where(real, new, old))
    grown = torch.cat([sizes, torch.zeros_like(sizes[..., :slots])], -1)
    grown = grown.scatter_add(-1, old.clamp(min=0), -real.long())
    grown = grown.scatter_add(-1, new, real.long())
    # the left clusters' centroids lose the moved keys; a singleton's centroid is its key
    keys = k.gather(2, top[..., None].expand(b, h, slots, d)).float()
    sums = centroids * sizes[..., None].float()
    sums = sums.scatter_add(2, old.clamp(min=0)[..., None].expand(b, h, slots, d),
                            -keys * real[..., None])
    cents = torch.cat([sums, keys * real[..., None]], 2)
    cents = torch.where(grown[..., None] > 0, cents / grown.clamp(min=1)[..., None].float(),
                        torch.cat([centroids, torch.zeros_like(keys)], 2))
    return cents, labels, grown


def cluster_spread(k: Tensor, centroids: Tensor, labels: Tensor, sizes: Tensor) -> Tensor:
    """Mean squared distance of each cluster's keys to its centroid, per dimension.

    ``sigma^2 = mean_k |k - c|^2 / d``: with it, ``q . c + |q|^2 sigma^2 / 2`` is the log of a
    member's mean ``exp(q . k)`` when the keys spread like an isotropic Gaussian around
    ``c``, which ranks a cluster of varied keys above a tight one with the same centroid
    score (what Tactic's ranking needs: the clusters that hold the most attention).

    Returns ``[B, H, C]`` float32 (0 for empty clusters).
    """
    d = k.shape[-1]
    r2 = _residual_norms(k, centroids, labels)
    tot = torch.zeros(sizes.shape, device=k.device).scatter_add_(-1, labels.clamp(min=0), r2)
    return tot / (sizes.clamp(min=1).float() * d)


# --- centroid scores ---------------------------------------------------------------------

def centroid_scores_reference(q: Tensor, centroids: Tensor, sizes: Tensor, scale: float) -> Tensor:
    """``scale * q . centroid`` per query head and cluster, ``-inf`` for empty clusters.

    ``q [B, Hq, d]``, ``centroids [B, Hkv, C, d]`` (any float dtype), ``sizes [B, Hkv, C]``;
    returns ``[B, Hq, C]`` float32.
    """
    b, hq, d = q.shape
    hkv, c = centroids.shape[1], centroids.shape[2]
    # reads: C * d centroid values per KV head, once for the whole group
    qg = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bhcd->bhgc", qg, centroids.float()) * scale
    s = torch.where((sizes > 0)[:, :, None, :], s, torch.full_like(s, float("-inf")))
    return s.view(b, hq, c)


@kernel
def _centroid_scores_kernel(
    q_ptr, cent_ptr, sizes_ptr, out_ptr,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_cc, stride_sb, stride_sh,
    HKV, C, D, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program per (sequence, KV head, BLOCK_C centroids), scored for the whole group
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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
    size = tl.load(sizes_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + offs_c,
                   mask=mc, other=0)
    s = tl.where((size > 0)[None, :], s * scale, float("-inf"))
    out = out_ptr + (b.to(tl.int64) * HKV * GROUP + h * GROUP + g[:, None]) * C + offs_c[None, :]
    tl.store(out, s, mask=mg[:, None] & mc[None, :])


def centroid_scores_triton(q: Tensor, centroids: Tensor, sizes: Tensor, scale: float) -> Tensor:
    """Triton version of :func:`centroid_scores_reference` (same contract)."""
    q, centroids = last_dim_dense(q), last_dim_dense(centroids)
    sizes = last_dim_dense(sizes)
    b, hq, d = q.shape
    hkv, c = centroids.shape[1], centroids.shape[2]
    out = torch.empty(b, hq, c, dtype=torch.float32, device=q.device)
    if c == 0:
        return out
    g = hq // hkv
    block_d = max(16, next_pow2(d))
    block_c = max(16, min(128, 8192 // block_d, next_pow2(c)))
    _centroid_scores_kernel[(b * hkv, cdiv(c, block_c))](
        q, centroids, sizes, out, q.stride(0), q.stride(1), *row_strides(centroids),
        sizes.stride(0), sizes.stride(1), hkv, c, d, float(scale),
        GROUP=g, BLOCK_G=dot_block(g), BLOCK_C=block_c, BLOCK_D=block_d,
        DOT_F32=dot_in_f32(q, centroids), num_warps=8 if dot_in_f32(q, centroids) else 4,
    )
    return out


def centroid_scores(
    q: Tensor, centroids: Tensor, sizes: Tensor, scale: float, *, impl: str = "auto"
) -> Tensor:
    """Centroid logits; see :func:`centroid_scores_reference`."""
    b, hq, d = q.shape
    if centroids.dim() != 4 or centroids.shape[0] != b or centroids.shape[-1] != d or (
            hq % centroids.shape[1]):
        raise ValueError(f"centroids must be [B={b}, Hkv, C, d={d}] with Hkv dividing Hq={hq}, "
                         f"got {tuple(centroids.shape)}")
    if sizes.shape != centroids.shape[:3]:
        raise ValueError(f"sizes {tuple(sizes.shape)} must be [B, Hkv, C] = "
                         f"{tuple(centroids.shape[:3])}")
    if use_triton(impl, q, centroids):
        return centroid_scores_triton(q, centroids, sizes, scale)
    return centroid_scores_reference(q, centroids, sizes, scale)


# --- tokens of ranked clusters -----------------------------------------------------------

def cluster_tokens_reference(
    order: Tensor, take: Tensor, offsets: Tensor, members: Tensor, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Positions of the first ``take`` members of each ranked cluster, in rank order.

    Parameters
    ----------
    order : Tensor
        ``[B, H, C]`` int64 cluster ids in rank order.
    take : Tensor
        ``[B, H, C]`` int64 members to emit of the cluster ranked r (0 skips it; at most its
        size).
    offsets : Tensor
        ``[B, H, C]`` int64 first slot of each cluster's members in ``members``.
    members : Tensor
        ``[B, H, L]`` int32 positions grouped by cluster (CSR order).
    capacity : int
        Width of the output; members past it are dropped.

    Returns
    -------
    tokens : Tensor
        ``[B, H, capacity]`` int64 positions, first ``counts`` live, 0 after them.
    counts : Tensor
        ``[B, H]`` int64.
    ranks : Tensor
        ``[B, H, capacity]`` int64 rank of the cluster of each slot (0 after counts).
    """
    b, h, c = order.shape
    # reads: the C-long rows once, and one member position per emitted slot
    cum = take.cumsum(-1)
    total = cum[..., -1]
    j = torch.arange(capacity, device=order.device).expand(b, h, capacity).contiguous()
    r = torch.searchsorted(cum.contiguous(), j, right=True).clamp(max=c - 1)
    live = j < total[..., None]
    before = cum.gather(-1, r) - take.gather(-1, r)
    start = offsets.gather(-1, order.gather(-1, r))
    src = (start + j - before).clamp(0, max(members.shape[-1] - 1, 0))
    pos = members.gather(-1, src).to(torch.int64)
    zero = torch.zeros_like(pos)
    return torch.where(live, pos, zero), total.clamp(max=capacity), torch.where(live, r, zero)


@kernel
def _cluster_tokens_kernel(
    order_ptr, cum_ptr, take_ptr, offsets_ptr, members_ptr, tok_ptr, rank_ptr, counts_ptr,
    C, L, CAP, WRITE_RANK: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
):
    # one program per (sequence, head, BLOCK output slots): each slot finds its rank by
    # binary search over the row's cumulative take counts, then copies one member position
    # (slots past the row's count do nothing: they are masked, so they move no bytes)
    row = tl.program_id(0)
    cbase = row.to(tl.int64) * C
    total = tl.load(cum_ptr + cbase + C - 1)
    tl.store(counts_ptr + row, tl.minimum(total, CAP).to(tl.int64), mask=tl.program_id(1) == 0)
    if tl.program_id(1) * BLOCK >= total:  # a long capacity costs only these early exits
        return
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = (j < total) & (j < CAP)
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.full([BLOCK], 0, tl.int32) + C
    for _ in range(STEPS):  # smallest r with cum[r] > j
        active = live & (lo < hi)
        mid = (lo + hi) // 2
        v = tl.load(cum_ptr + cbase + mid, mask=active, other=0)
        right = v <= j
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    r = tl.minimum(lo, C - 1)
    before = tl.load(cum_ptr + cbase + r, mask=live, other=0) - tl.load(
        take_ptr + cbase + r, mask=live, other=0)
    cl = tl.load(order_ptr + cbase + r, mask=live, other=0)
    start = tl.load(offsets_ptr + cbase + cl, mask=live, other=0)
    pos = tl.load(members_ptr + row.to(tl.int64) * L + start + j - before, mask=live, other=0)
    tl.store(tok_ptr + row.to(tl.int64) * CAP + j, pos.to(tl.int64), mask=live)
    if WRITE_RANK:
        tl.store(rank_ptr + row.to(tl.int64) * CAP + j, r.to(tl.int64), mask=live)


def cluster_tokens_triton(
    order: Tensor, take: Tensor, offsets: Tensor, members: Tensor, capacity: int,
    with_ranks: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of :func:`cluster_tokens_reference`; slots past ``counts`` are left
    unwritten (their content is unspecified), so a long capacity costs nothing."""
    b, h, c = order.shape
    dev = order.device
    order, offsets = order.contiguous(), offsets.contiguous()
    take = take.to(torch.int64).contiguous()
    members = members.contiguous()
    cum = take.cumsum(-1)
    tokens = torch.empty(b, h, capacity, dtype=torch.int64, device=dev)
    ranks = torch.empty(b, h, capacity if with_ranks else 1, dtype=torch.int64, device=dev)
    counts = torch.empty(b, h, dtype=torch.int64, device=dev)
    block = 1024
    _cluster_tokens_kernel[(b * h, cdiv(max(capacity, 1), block))](
        order, cum, take, offsets, members, tokens, ranks, counts, c, members.shape[-1],
        capacity, WRITE_RANK=with_ranks, BLOCK=block, STEPS=max(1, c.bit_length() + 1),
        num_warps=4,
    )
    return tokens, counts, ranks


def cluster_tokens(
    order: Tensor, take: Tensor, offsets: Tensor, members: Tensor, capacity: int, *,
    with_ranks: bool = True, impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Member positions of ranked clusters; see :func:`cluster_tokens_reference`.

    The Triton path leaves the slots past ``counts`` unwritten (their content is
    unspecified); ``with_ranks=False`` skips the ranks output (then ``[B, H, 1]``).
    """
    if order.shape != take.shape or order.shape != offsets.shape:
        raise ValueError(f"order {tuple(order.shape)}, take {tuple(take.shape)} and offsets "
                         f"{tuple(offsets.shape)} must all be [B, H, C]")
    if members.shape[:2] != order.shape[:2]:
        raise ValueError(f"members {tuple(members.shape)} must be [B, H, L] with B, H of order")
    if capacity < 0:
        raise ValueError(f"capacity={capacity} must be >= 0")
    if order.shape[-1] > 0 and use_triton(impl, order, members):
        return cluster_tokens_triton(order, take, offsets, members, capacity, with_ranks)
    tokens, counts, ranks = cluster_tokens_reference(order, take, offsets, members, capacity)
    return tokens, counts, ranks if with_ranks else ranks[..., :1]
