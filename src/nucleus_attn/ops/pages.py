"""Quest page metadata: per-page channel-wise key min/max, page upper-bound scores, and the
choice of the best pages.

A page is ``page_size`` consecutive positions of the cache. For a query q, the score of
a page is an upper bound of q.k over its keys (Quest):
``sum_c max(q_c * max_c, q_c * min_c)``. Reading the bounds costs 2/page_size of the keys,
which is how Quest and Twilight's base selector avoid reading every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..span import KeySpan
from . import topk_split
from ._dispatch import (
    HandsWorkspace,
    cdiv,
    kernel,
    last_dim_dense,
    next_pow2,
    row_strides,
    tl,
    use_triton,
)
from .select import compact, group_logsoftmax_max, keep_best, mask_to_indices

MAX_ROW_PAGES = 1 << 16  # pages a row kernel keeps in registers (1M tokens at page 16)
SCORES_BLOCK_P = 32  # pages per page_scores tile (tuned on an H100, d=128)
SCORES_WARPS = 4
SCORES_TILES = 1  # tiles per program when statistics are written (one chunk of the stats):
# 4 tiles (fewer, longer programs) made Quest 55 us slower at 128k x 8 on an H200
STATS_CHUNK = 128  # pages per chunk of the reference's PageStats


def num_pages(n: int, page_size: int) -> int:
    return math.ceil(n / page_size)


def page_valid(span: KeySpan, page_size: int, pages: int) -> Tensor:
    """``[B, P]`` bool: the page holds at least one valid key."""
    first = torch.arange(pages, device=span.starts.device)[None, :] * page_size
    return (first < span.ends[:, None]) & (first + page_size > span.starts[:, None])


# --- page min/max ------------------------------------------------------------------------

def page_minmax_reference(
    k: Tensor, span: KeySpan, page_size: int, first_page: int = 0
) -> tuple[Tensor, Tensor]:
    """Min and max key of each page from ``first_page`` on, over valid keys only.

    Parameters
    ----------
    k : Tensor
        ``[B, Hkv, N, d]`` keys (post-RoPE).
    span : KeySpan
        Valid positions; padding never enters a bound.
    page_size : int
        Positions per page.
    first_page : int
        Pages before it are not recomputed (used by the append update).

    Returns
    -------
    kmin, kmax : Tensor
        ``[B, Hkv, P - first_page, d]`` in k's dtype; pages without a valid key hold 0.
    """
    b, h, n, d = k.shape
    pages = num_pages(n, page_size) - first_page
    start = first_page * page_size
    pad = pages * page_size - (n - start)
    kk = torch.nn.functional.pad(k[:, :, start:], (0, 0, 0, pad))
    valid = torch.nn.functional.pad(span.valid_mask()[:, start:], (0, pad))
    valid = valid[:, None, :, None]
    # reads: all keys once; writes: 2 * pages * d
    inf = torch.tensor(float("inf"), dtype=k.dtype, device=k.device)
    kmin = torch.where(valid, kk, inf).view(b, h, pages, page_size, d).amin(3)
    kmax = torch.where(valid, kk, -inf).view(b, h, pages, page_size, d).amax(3)
    alive = valid.view(b, 1, pages, page_size).any(-1, keepdim=True)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(alive, kmin, zero), torch.where(alive, kmax, zero)


@kernel
def _page_minmax_kernel(
    k_ptr, starts_ptr, ends_ptr, kmin_ptr, kmax_ptr,
    stride_kb, stride_kh, stride_kn, H, N, D, first_page, pages_out,
    PAGE: tl.constexpr, BLOCK_PG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (sequence, KV head, BLOCK_PG pages): reads their keys once
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    start = tl.load(starts_ptr + b)
    end = tl.load(ends_ptr + b)
    pg = tl.program_id(1) * BLOCK_PG + tl.arange(0, BLOCK_PG)  # [PG]
    t0 = (first_page + pg).to(tl.int64) * PAGE
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    lo = tl.full([BLOCK_PG, BLOCK_D], float("inf"), tl.float32)
    hi = tl.full([BLOCK_PG, BLOCK_D], float("-inf"), tl.float32)
    for i in range(0, PAGE, BLOCK_T):
        j = i + tl.arange(0, BLOCK_T)
        t = t0[:, None] + j[None, :]  # [PG, T]
        valid = (j[None, :] < PAGE) & (t >= start) & (t < end) & (pg[:, None] < pages_out)
        m = valid[:, :, None] & mask_d[None, None, :]
        x = tl.load(base + t[:, :, None] * stride_kn + offs_d[None, None, :], mask=m, other=0.0)
        x = x.to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(m, x, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(m, x, float("-inf")), axis=1))
    alive = ((t0 < end) & (t0 + PAGE > start))[:, None]
    lo = tl.where(alive, lo, 0.0)
    hi = tl.where(alive, hi, 0.0)
    out = (bh.to(tl.int64) * pages_out + pg[:, None]) * D + offs_d[None, :]
    ok = mask_d[None, :] & (pg[:, None] < pages_out)
    tl.store(kmin_ptr + out, lo.to(kmin_ptr.dtype.element_ty), mask=ok)
    tl.store(kmax_ptr + out, hi.to(kmax_ptr.dtype.element_ty), mask=ok)


def page_minmax_triton(
    k: Tensor, span: KeySpan, page_size: int, first_page: int = 0
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`page_minmax_reference` (same contract)."""
    k = last_dim_dense(k)
    b, h, n, d = k.shape
    pages = num_pages(n, page_size) - first_page
    kmin = torch.empty(b, h, pages, d, dtype=k.dtype, device=k.device)
    kmax = torch.empty_like(kmin)
    if pages <= 0 or b * h == 0:
        return kmin, kmax
    block_t = min(next_pow2(page_size), 64)
    block_d = next_pow2(d)
    block_pg = max(1, min(next_pow2(pages), 8192 // (block_t * block_d)))
    _page_minmax_kernel[(b * h, cdiv(pages, block_pg))](
        k, span.starts, span.ends, kmin, kmax, *row_strides(k), h, n, d, first_page, pages,
        PAGE=page_size, BLOCK_PG=block_pg, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return kmin, kmax


def page_minmax(
    k: Tensor, span: KeySpan, page_size: int, first_page: int = 0, *, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Per-page key bounds; see :func:`page_minmax_reference` for the contract."""
    if page_size < 1:
        raise ValueError(f"page_size={page_size} must be >= 1")
    if not 0 <= first_page < num_pages(k.shape[2], page_size):
        raise ValueError(f"first_page={first_page} must be in "
                         f"[0, {num_pages(k.shape[2], page_size) - 1}] (pages of N={k.shape[2]})")
    if use_triton(impl, k):
        return page_minmax_triton(k, span, page_size, first_page)
    return page_minmax_reference(k, span, page_size, first_page)


def last_page_minmax(k: Tensor, span: KeySpan, page_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bounds of the page holding each sequence's last valid key, read on the device.

    The update of a static (pre-allocated) cache, whose newest token sits at
    ``span.ends - 1``: N does not change, so the page to recompute is a device value and
    the update needs no host sync (CUDA-graph safe). Plain torch: it reads one page.

    Returns
    -------
    kmin, kmax : Tensor
        ``[B, Hkv, 1, d]`` in k's dtype, over the page's valid keys.
    page : Tensor
        ``[B]`` int64 page index.
    """
    b, h, n, d = k.shape
    last = span.ends - 1
    page = torch.div(last, page_size, rounding_mode="floor")
    pos = page[:, None] * page_size + torch.arange(page_size, device=k.device)  # [B, ps]
    valid = (pos >= span.starts[:, None]) & (pos <= last[:, None])
    rows = k.gather(2, pos.clamp(max=n - 1)[:, None, :, None].expand(b, h, page_size, d))
    valid = valid[:, None, :, None]
    inf = torch.full((), float("inf"), dtype=k.dtype, device=k.device)  # no host copy
    kmin = torch.where(valid, rows, inf).amin(2, keepdim=True)
    kmax = torch.where(valid, rows, -inf).amax(2, keepdim=True)
    return kmin, kmax, page


# --- page scores -------------------------------------------------------------------------

@dataclass(frozen=True)
class PageStats(HandsWorkspace):
    """Softmax statistics of page bounds at a softmax scale, per chunk of pages, from the
    kernel that wrote the bounds: what :func:`topk_pages` needs to rank pages by the
    group's log-softmax without reading the rows once more first.

    Attributes
    ----------
    chunk : int
        Pages per chunk: page ``i`` is in chunk ``i // chunk``.
    scale : float
        The softmax scale the statistics are of (``x = scale * bound``).
    max, min : Tensor
        ``[B, Hq, C]`` float32 largest / smallest finite ``x`` of each chunk (``-inf`` /
        ``inf`` when the chunk has no page with a valid key).
    sumexp : Tensor
        ``[B, Hq, C]`` float32 ``sum(exp(x - max))`` over the chunk's finite ``x``.
    workspace : Tensor or None
        Zeroed int32 counters for the top-k kernel, zeroed inside the producer's launch;
        used at most once.
    """

    chunk: int
    scale: float
    max: Tensor
    min: Tensor
    sumexp: Tensor


def page_stats_reference(bounds: Tensor, scale: float, chunk: int = STATS_CHUNK) -> PageStats:
    """Reference :class:`PageStats` of ``[B, Hq, P]`` bounds (``-inf`` = no valid key)."""
    b, hq, p = bounds.shape
    c = max(1, -(-p // chunk))
    x = torch.nn.functional.pad(bounds.float() * scale, (0, c * chunk - p),
                                value=float("-inf")).view(b, hq, c, chunk)
    fin = torch.isfinite(x)
    mx = torch.where(fin, x, float("-inf")).amax(-1)
    mn = torch.where(fin, x, float("inf")).amin(-1)
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    se = torch.where(fin, torch.exp(x - ref[..., None]), torch.zeros_like(x)).sum(-1)
    return PageStats(chunk, float(scale), mx, mn, se)


def page_scores_reference(
    q: Tensor, kmin: Tensor, kmax: Tensor, span: KeySpan, page_size: int
) -> Tensor:
    """Upper bound of q.k per page and query head.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    kmin, kmax : Tensor
        ``[B, Hkv, P, d]`` page bounds.

    Returns
    -------
    Tensor
        ``[B, Hq, P]`` float32 (not multiplied by the softmax scale); pages with no
        valid key are ``-inf``.
    """
    b, hq, d = q.shape
    hkv, p = kmin.shape[1], kmin.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, 1, d)
    # reads: 2 * P * d bounds per KV head, shared by the group's query heads
    lo = qg * kmin.float()[:, :, None]
    hi = qg * kmax.float()[:, :, None]
    s = torch.maximum(lo, hi).sum(-1).view(b, hq, p)
    alive = page_valid(span, page_size, p)[:, None, :]
    return torch.where(alive, s, torch.full_like(s, float("-inf")))


@kernel(do_not_specialize=("CS", "WS_N"))
def _page_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, starts_ptr, ends_ptr, out_ptr, smax_ptr, smin_ptr, ssum_ptr,
    ws_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_kp, HKV, P, D, CS, WS_N, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, TILES: tl.constexpr, STATS: tl.constexpr, ZB: tl.constexpr,
):
    # one program per (sequence, KV head, TILES blocks of pages); the bounds are read once
    # and scored for every query head of the group. STATS: also the chunk's max, min and
    # sum of exp of scale * bound per query head (one chunk = this program's pages), and
    # the top-k kernel's workspace zeroed (a share of it per program)
    bh = tl.program_id(0)
    ct = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    base = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    start = tl.load(starts_ptr + b)
    end = tl.load(ends_ptr + b)
    hq = HKV * GROUP
    g = tl.arange(0, BLOCK_G)
    smx = tl.full([BLOCK_G], float("-inf"), tl.float32)
    smn = tl.full([BLOCK_G], float("inf"), tl.float32)
    sse = tl.zeros([BLOCK_G], tl.float32)
    for t in tl.static_range(TILES):
        offs_p = (ct * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        m = mask_p[:, None] & mask_d[None, :]
        off = base + offs_p[:, None].to(tl.int64) * stride_kp + offs_d[None, :]
        lo = tl.load(kmin_ptr + off, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(kmax_ptr + off, mask=m, other=0.0).to(tl.float32)
        first = offs_p.to(tl.int64) * PAGE
        alive = (first < end) & (first + PAGE > start)
        xs = tl.full([BLOCK_G, BLOCK_P], float("-inf"), tl.float32)  # the heads' scaled bounds
        for j in range(GROUP):
            qh = h * GROUP + j
            qv = tl.load(q_ptr + b * stride_qb + qh * stride_qh + offs_d, mask=mask_d, other=0.0)
            qv = qv.to(tl.float32)[None, :]
            s = tl.sum(tl.maximum(qv * lo, qv * hi), axis=1)
            s = tl.where(alive, s, float("-inf"))
            tl.store(out_ptr + (b.to(tl.int64) * hq + qh) * P + offs_p, s, mask=mask_p)
            if STATS:
                x = tl.where(mask_p, s * scale, float("-inf"))
                xs = tl.where((g == j)[:, None], x[None, :], xs)
        if STATS:  # one reduction per statistic for all heads of the tile
            fin = xs > float("-inf")
            new = tl.maximum(smx, tl.max(xs, axis=1))
            ref = tl.where(new > float("-inf"), new, 0.0)
            add = tl.sum(tl.where(fin, tl.exp(xs - ref[:, None]), 0.0), axis=1)
            sse = sse * tl.exp(smx - ref) + add
            smx = new
            smn = tl.minimum(smn, tl.min(tl.where(fin, xs, float("inf")), axis=1))
    if STATS:
        mg = g < GROUP
        srow = (b.to(tl.int64) * hq + h * GROUP + g) * CS + ct
        tl.store(smax_ptr + srow, smx, mask=mg)
        tl.store(smin_ptr + srow, smn, mask=mg)
        tl.store(ssum_ptr + srow, sse, mask=mg)
        step = tl.num_programs(0) * tl.num_programs(1) * ZB
        i = (ct * tl.num_programs(0) + bh) * ZB
        while i < WS_N:
            zz = i + tl.arange(0, ZB)
            tl.store(ws_ptr + zz, tl.zeros([ZB], tl.int32), mask=zz < WS_N)
            i += step


def page_scores_triton(
    q: Tensor, kmin: Tensor, kmax: Tensor, span: KeySpan, page_size: int,
    stats: bool = False, scale: float = 1.0,
) -> Tensor | tuple[Tensor, PageStats]:
    """Triton version of :func:`page_scores_reference` (same contract); with ``stats``
    also the :class:`PageStats` of ``scale * bounds`` and a zeroed top-k workspace."""
    q, kmin, kmax = last_dim_dense(q), last_dim_dense(kmin), last_dim_dense(kmax)
    if kmin.stride() != kmax.stride():
        kmax = kmax.contiguous()
        kmin = kmin.contiguous()
    b, hq, d = q.shape
    hkv, p = kmin.shape[1], kmin.shape[2]
    out = torch.empty(b, hq, p, dtype=torch.float32, device=q.device)
    if p == 0:
        return (out, page_stats_reference(out, scale)) if stats else out
    block_d = next_pow2(d)
    block_p = max(1, min(SCORES_BLOCK_P, 8192 // block_d, next_pow2(p)))
    tiles = max(1, min(SCORES_TILES, cdiv(p, block_p))) if stats else 1
    cs = cdiv(p, block_p * tiles)
    if stats:
        st = [torch.empty(b, hq, cs, dtype=torch.float32, device=q.device) for _ in range(3)]
        ws = torch.empty(b * hkv * topk_split.WORKSPACE_PER_ROW, dtype=torch.int32,
                         device=q.device)
    else:
        st, ws = [out, out, out], out
    _page_scores_kernel[(b * hkv, cs)](
        q, kmin, kmax, span.starts, span.ends, out, *st, ws, q.stride(0), q.stride(1),
        *row_strides(kmin), hkv, p, d, cs, ws.numel() if stats else 0, float(scale),
        GROUP=hq // hkv, BLOCK_G=next_pow2(hq // hkv), PAGE=page_size, BLOCK_P=block_p,
        BLOCK_D=block_d, TILES=tiles, STATS=stats, ZB=256, num_warps=SCORES_WARPS,
    )
    if not stats:
        return out
    return out, PageStats(block_p * tiles, float(scale), st[0], st[1], st[2], workspace=ws)


def page_scores(
    q: Tensor, kmin: Tensor, kmax: Tensor, span: KeySpan, page_size: int, *,
    stats: bool = False, scale: float = 1.0, impl: str = "auto",
) -> Tensor | tuple[Tensor, PageStats]:
    """Quest page upper bounds; see :func:`page_scores_reference` for the contract.

    With ``stats=True`` also returns their :class:`PageStats` at softmax scale ``scale``
    (pass the ``scale`` that :func:`topk_pages` will get), written in the same pass, for
    ``topk_pages(..., stats=...)``.
    """
    if kmin.shape != kmax.shape or kmin.shape[-1] != q.shape[-1]:
        raise ValueError(f"kmin {tuple(kmin.shape)} and kmax {tuple(kmax.shape)} must both be "
                         f"[B, Hkv, P, d] with d={q.shape[-1]} as in q")
    if use_triton(impl, q, kmin, kmax):
        return page_scores_triton(q, kmin, kmax, span, page_size, stats, scale)
    out = page_scores_reference(q, kmin, kmax, span, page_size)
    return (out, page_stats_reference(out, scale)) if stats else out


# --- the best pages, as token positions --------------------------------------------------

def topk_pages_capacity(pages: int, page_size: int, k: int, sink: int, window: int) -> int:
    """Most pages :func:`topk_pages` can keep: ``k``, or the forced pages when they are more
    (at most ``ceil(sink / page_size) + 1`` at the start and ``ceil(window / page_size) + 1``
    at the end)."""
    most = k + -(-sink // page_size) + -(-window // page_size) + 2
    return max(1, min(pages, most))


def topk_pages_reference(
    bounds: Tensor, num_kv_heads: int, span: KeySpan, page_size: int, k: int, sink: int,
    window: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """Token positions of the ``k`` best pages per KV head, pages with sink/window forced.

    Pages are ranked by the group's maximum log-softmax of the scaled bounds
    (:func:`nucleus_attn.ops.group_logsoftmax_max`). Pages holding one of the first
    ``sink`` or last ``window`` valid tokens are always kept and count towards ``k``; the
    best other pages (with a valid key) fill the remaining places. When the forced pages
    alone are more than ``k``, only they are kept.

    Parameters
    ----------
    bounds : Tensor
        ``[B, Hq, P]`` float32 page upper bounds (:func:`page_scores`), ``-inf`` for pages
        without a valid key.
    num_kv_heads : int
        Hkv (``Hq % Hkv == 0``).
    span : KeySpan
        Valid positions (``P * page_size >= span.n``).
    page_size : int
        Positions per page.
    k : int
        Pages kept per KV head (clipped to P).
    sink, window : int
        Tokens whose pages are always kept.
    scale : float
        Softmax scale applied to the bounds before the log-softmax.

    Returns
    -------
    indices : Tensor
        ``[B, Hkv, C * page_size]`` int64 valid positions of the kept pages, ascending,
        first ``counts`` live, 0 after them; ``C`` is :func:`topk_pages_capacity`.
    counts : Tensor
        ``[B, Hkv]`` int64.
    """
    p = bounds.shape[-1]
    # reads: Hq * P floats (twice); the page ids and positions are a few bytes per page
    agg = group_logsoftmax_max(bounds * scale, num_kv_heads)
    pos = span.positions().expand(span.starts.shape[0], -1)
    forced_tok = span.forced(pos, sink, window)
    forced = torch.nn.functional.pad(forced_tok, (0, p * page_size - span.n))
    forced = forced.view(-1, 1, p, page_size).any(-1).expand_as(agg)
    chosen = keep_best(agg, k, forced)
    ids, cnt = mask_to_indices(chosen, topk_pages_capacity(p, page_size, k, sink, window))
    live = torch.arange(ids.shape[-1], device=ids.device) < cnt[..., None]
    ids = torch.where(live, ids, torch.full_like(ids, p))  # page P lies past every span
    return pages_to_tokens(ids, page_size, span)


@kernel
def _topk_pages_kernel(
    bounds_ptr, starts_ptr, ends_ptr, pages_ptr, offs_ptr, counts_ptr,
    HKV, P, K, CAP, scale, sink, window,
    GROUP: tl.constexpr, PAGE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # one program per (sequence, KV head); the whole row of pages stays in registers
    row = tl.program_id(0)
    b = row // HKV
    offs = tl.arange(0, BLOCK_P)
    inb = offs < P
    # 1. group maximum of the per-head log-softmax of the scaled bounds
    agg = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for j in range(GROUP):
        s = tl.load(bounds_ptr + (row.to(tl.int64) * GROUP + j) * P + offs, mask=inb,
                    other=float("-inf")) * scale
        mx = tl.max(s, axis=0)
        finite = mx > float("-inf")
        ms = tl.where(finite, mx, 0.0)
        lse = ms + tl.log(tl.sum(tl.exp(s - ms), axis=0))
        agg = tl.maximum(agg, tl.where(finite, s - lse, float("-inf")))
    # 2. pages holding sink or window tokens are forced in (positions fit in int32)
    start = tl.load(starts_ptr + b).to(tl.int32)
    end = tl.load(ends_ptr + b).to(tl.int32)
    first = offs * PAGE
    last = first + PAGE
    s_end = tl.minimum(start + sink, end)
    w_start = tl.maximum(end - window, start)
    forced = inb & (((first < s_end) & (last > start) & (start < s_end))
                    | ((first < end) & (last > w_start) & (w_start < end)))
    cand = inb & (~forced) & (agg > float("-inf"))
    room = K - tl.sum(forced.to(tl.int32), axis=0)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)
    # 3. the room-th best candidate: radix select over order-preserving integer keys, one
    # byte at a time from the top (a 256-bin histogram per byte, no sort)
    bits = agg.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order = float order
    ukey = key ^ (-2147483648)  # the same order, as unsigned bit patterns
    bins = tl.arange(0, 256)
    need = room  # places still to fill among the candidates matching the prefix
    prefix = tl.zeros([], tl.int32)  # digits chosen so far, in place
    for i in tl.static_range(4):
        shift = 24 - 8 * i
        # (from the second byte on: the bits above this byte equal the prefix)
        match = cand if i == 0 else cand & (((ukey ^ prefix) >> (shift + 8)) == 0)
        hist = tl.histogram((ukey >> shift) & 255, 256, mask=match)
        at_least = tl.cumsum(hist, axis=0, reverse=True)  # candidates with digit >= bin
        digit = tl.sum((at_least >= need).to(tl.int32), axis=0) - 1
        need -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        prefix = prefix | (digit << shift)
    kth = prefix ^ (-2147483648)  # back to the signed key of the room-th best
    above = cand & (key > kth)
    tie = cand & (key == kth)
    best = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    best = tl.where(n_cand <= room, cand, best & (room > 0))
    sel = forced | best
    # 4. compact the kept pages (ascending) with the offsets of their valid tokens
    ntok = tl.maximum(tl.minimum(last, end) - tl.maximum(first, start), 0)
    ntok = tl.where(sel, ntok, 0)
    tok_off = tl.cumsum(ntok, axis=0) - ntok
    slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    base = row.to(tl.int64) * CAP
    tl.store(pages_ptr + base + slot, offs, mask=sel & (slot < CAP))
    tl.store(offs_ptr + base + slot, tok_off.to(tl.int64), mask=sel & (slot < CAP))
    tl.store(pages_ptr + base + offs, tl.full([BLOCK_P], -1, tl.int32),
             mask=(offs >= n_sel) & (offs < CAP))
    tl.store(counts_ptr + row, tl.sum(ntok, axis=0).to(tl.int64))


@kernel
def _expand_pages_kernel(
    pages_ptr, offs_ptr, counts_ptr, starts_ptr, ends_ptr, out_ptr, HKV, CAP,
    PAGE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # one program per (sequence, KV head, block of kept pages): writes their positions
    row = tl.program_id(0)
    b = row // HKV
    slot = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ms = slot < CAP
    page = tl.load(pages_ptr + row.to(tl.int64) * CAP + slot, mask=ms, other=-1).to(tl.int64)
    off = tl.load(offs_ptr + row.to(tl.int64) * CAP + slot, mask=ms & (page >= 0), other=0)
    start = tl.load(starts_ptr + b)
    end = tl.load(ends_ptr + b)
    j = tl.arange(0, BLOCK_T)
    tok = page[:, None] * PAGE + j[None, :]
    valid = (page >= 0)[:, None] & (j[None, :] < PAGE) & (tok >= start) & (tok < end)
    dst = off[:, None] + tok - tl.maximum(page * PAGE, start)[:, None]
    base = out_ptr + row.to(tl.int64) * CAP * PAGE
    tl.store(base + dst, tok, mask=valid)
    # the slots of this block past the row's count are padding (0)
    total = tl.load(counts_ptr + row)
    pad = slot[:, None].to(tl.int64) * PAGE + j[None, :]
    tl.store(base + pad, tl.zeros_like(tok),
             mask=ms[:, None] & (j[None, :] < PAGE) & (pad >= total))


def topk_pages_triton(
    bounds: Tensor, num_kv_heads: int, span: KeySpan, page_size: int, k: int, sink: int,
    window: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`topk_pages_reference` (same contract, exact ties aside)."""
    b, hq, p = bounds.shape
    hkv = num_kv_heads
    block_p = next_pow2(p)
    if block_p > MAX_ROW_PAGES:  # a row no longer fits in registers
        return topk_pages_reference(bounds, hkv, span, page_size, k, sink, window, scale)
    cap = topk_pages_capacity(p, page_size, k, sink, window)
    bounds = bounds.contiguous()
    dev = bounds.device
    pages = torch.empty(b, hkv, cap, dtype=torch.int32, device=dev)
    offs = torch.empty(b, hkv, cap, dtype=torch.int64, device=dev)
    counts = torch.empty(b, hkv, dtype=torch.int64, device=dev)
    indices = torch.empty(b, hkv, cap * page_size, dtype=torch.int64, device=dev)
    # one warp per 512 pages of the row (H200, 8192 pages: 16 warps 48 us, 4 warps 180 us;
    # a 16384-page row spills at 16: scripts/tune_decode_kernels.py)
    warps = max(4, min(32, block_p // 512))
    _topk_pages_kernel[(b * hkv,)](
        bounds, span.starts, span.ends, pages, offs, counts, hkv, p, min(k, p), cap,
        float(scale), sink, window, GROUP=hq // hkv, PAGE=page_size, BLOCK_P=block_p,
        num_warps=warps,
    )
    block_t = next_pow2(page_size)
    block_k = max(1, min(64, 2048 // block_t, next_pow2(cap)))
    _expand_pages_kernel[(b * hkv, cdiv(cap, block_k))](
        pages, offs, counts, span.starts, span.ends, indices, hkv, cap,
        PAGE=page_size, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=4,
    )
    return indices, counts


def topk_pages(
    bounds: Tensor, num_kv_heads: int, span: KeySpan, page_size: int, k: int, sink: int,
    window: int, scale: float, *, stats: PageStats | None = None, impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The best pages' token positions; see :func:`topk_pages_reference` for the contract.

    The Triton path finds the k-th best page by a radix select over the scores (no sort)
    and breaks exact ties by page order; the reference leaves ties to ``torch.topk``.
    Rows of at least ``topk_split.SPLIT_MIN_PAGES`` pages are split over many programs
    (:mod:`nucleus_attn.ops.topk_split`), starting from ``stats``: the
    :class:`PageStats` that ``page_scores(..., stats=True, scale=scale)`` returned with
    these bounds (computed here when None).
    """
    b, hq, p = bounds.shape
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide Hq={hq}")
    if k < 1:
        raise ValueError(f"k={k} pages must be >= 1")
    if p * page_size < span.n:
        raise ValueError(f"P={p} pages of {page_size} do not cover the span's N={span.n}")
    if stats is not None:
        c = stats.max.shape[-1]
        if (stats.max.shape != (b, hq, c) or c != -(-p // stats.chunk)
                or stats.scale != float(scale)):
            raise ValueError(f"stats (chunks of {stats.chunk} pages at scale {stats.scale}, "
                             f"{tuple(stats.max.shape)}) do not belong to bounds "
                             f"{tuple(bounds.shape)} at scale {scale}; pass the stats that "
                             "page_scores(..., stats=True, scale=scale) returned with them")
    if use_triton(impl, bounds):
        if topk_split.split_wanted(p, b * num_kv_heads):
            if stats is None:
                stats = page_stats_reference(bounds, scale)
            cap = topk_pages_capacity(p, page_size, k, sink, window)
            ws = stats.take_workspace(b * num_kv_heads * topk_split.WORKSPACE_PER_ROW)
            return topk_split.topk_split(bounds.contiguous(), num_kv_heads, span, page_size, k,
                                         sink, window, scale, stats.max.contiguous(),
                                         stats.min.contiguous(), stats.sumexp.contiguous(),
                                         ws, cap)
        return topk_pages_triton(bounds, num_kv_heads, span, page_size, k, sink, window, scale)
    return topk_pages_reference(bounds, num_kv_heads, span, page_size, k, sink, window, scale)


def topk_pages_uses_stats(pages: int, batch: int, num_kv_heads: int, device: torch.device,
                          impl: str = "auto") -> bool:
    """Whether :func:`topk_pages` on these rows starts from the bounds' :class:`PageStats`
    (its split kernel does), i.e. whether ``page_scores`` should write them: a host-side
    decision from the shapes, no sync."""
    if not use_triton(impl, torch.empty(0, device=device)):
        return False
    return topk_split.split_wanted(pages, batch * num_kv_heads)


# --- pages -> tokens ---------------------------------------------------------------------

def pages_to_tokens(page_ids: Tensor, page_size: int, span: KeySpan) -> tuple[Tensor, Tensor]:
    """Token positions of the chosen pages, ascending, padding and out-of-span removed.

    ``page_ids`` is ``[B, Hkv, K]``; returns ``indices [B, Hkv, K * page_size]`` and
    ``counts [B, Hkv]``.
    """
    b, h, kp = page_ids.shape
    ordered = torch.sort(page_ids, dim=-1).values
    tok = ordered[..., None] * page_size + torch.arange(page_size, device=page_ids.device)
    tok = tok.view(b, h, kp * page_size)
    s, e = span.starts.view(b, 1, 1), span.ends.view(b, 1, 1)
    return compact(tok, (tok >= s) & (tok < e))
