"""The best pages per KV head with each row split over many programs (two launches).

The ranking key of page i is the group's maximum log-softmax of its scaled bounds,
``key_i = max_j (scale * s_ij - lse_j)`` (:func:`nucleus_attn.ops.group_logsoftmax_max`).
``lse_j`` needs the whole row, so it comes from the per-chunk statistics page_scores
wrote with the bounds (:class:`nucleus_attn.ops.pages.PageStats`: max, min and sum of exp
of the scaled bounds per chunk of pages), which also bound the keys:
``max_j (min_j - lse_j) <= key_i <= max_j (max_j - lse_j)``.

1. **histogram** (phase 1, one program per (row, chunk of ``T`` pages)): keys, written to
   a scratch row; pages holding sink or window tokens are forced; the other valid pages
   are counted in ``NBK`` equal bins of the key range (``tl.histogram``, added into the
   row's histogram with integer atomics: exact and order-free). The row's last program
   (ticket) finds the bin holding the ``room``-th best candidate (``room = k - forced``),
   scans the row's keys once (from L2) to count, per chunk, the tokens of the pages kept
   for sure and to list the members of that bin (in page order), picks the exact
   ``need``-th best among them by a radix select over their order-preserving key bits (4
   passes of 8 bits; ties by page order), adds the chosen members' tokens to their
   chunks, and turns the counts into each chunk's output offset.
2. **write** (phase 2): the token positions of each chunk's kept pages (ascending,
   clipped to the span) at its offset, and zeros after the row's count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..span import KeySpan
from ._dispatch import cdiv, interpreting, kernel, next_pow2, num_sms, tl

NBK = 256  # bins of the key range
# launch settings, measured with scripts/tune_selection_kernels.py on an H200 (Llama-3-8B
# heads, 8192 pages): 256 pages a program at B=1 (34 us, row kernel 56 us), 1024 at B=8
# (48 us, row kernel 55 us), 4 warps
MIN_CHUNK = 256
MAX_CHUNK = 2048
PROGRAMS_PER_SM = 4
SPLIT_MIN_PAGES = 1024  # rows of fewer pages keep the one-program-per-row kernel
SPLIT_MAX_ROWS = 16  # more KV-head rows than this keep the row kernel (see split_wanted)
SCAN = 4096  # keys the last program scans at once
# block sizes of the last program's loops (boundary pages, chunk offsets, stats per load)
LIST_BLOCK = 1024
PREFIX_CHUNKS = 1024
STATS_BLOCK = 256
WORKSPACE_PER_ROW = NBK + 4  # zeroed int32: histogram, forced count, ticket


def split_wanted(pages: int, rows: int | None = None) -> bool:
    """Whether ``rows`` KV-head rows of ``pages`` pages take the split kernel.

    Below ``SPLIT_MIN_PAGES`` a row fits one program's registers (the row kernel of
    :mod:`~nucleus_attn.ops.pages`) and is short enough not to leave the GPU waiting on it.
    With many rows the row kernel fills the GPU by itself, and the split kernel's need for
    the bounds' statistics costs page_scores more than it saves: on an H200 at 8192 pages
    the split kernel took 34 us against 56 at 8 rows (B=1), 48 against 55 at 64 rows
    (B=8), but page_scores with statistics took ~30 us longer at 64 rows.
    """
    return pages >= SPLIT_MIN_PAGES and (rows is None or rows <= SPLIT_MAX_ROWS)


def split_plan(rows: int, pages: int, device: torch.device) -> tuple[int, int]:
    """(pages per program ``T``, warps): about ``PROGRAMS_PER_SM`` programs per SM, ``T`` a
    power of two in [``MIN_CHUNK``, ``MAX_CHUNK``]."""
    want = max(1, cdiv(PROGRAMS_PER_SM * num_sms(device), max(rows, 1)))
    t = max(MIN_CHUNK, min(MAX_CHUNK, next_pow2(cdiv(pages, want))))
    if interpreting():
        t = min(t, next_pow2(max(pages, 16)))
    return t, 4


@kernel(do_not_specialize=("K", "CS", "CAPT"))
def _topk_split_kernel(
    bounds_ptr, smax_ptr, smin_ptr, ssum_ptr, starts_ptr, ends_ptr, ws_ptr, sc_ptr,
    out_ptr, counts_ptr, HKV, P, K, CS, CAPT, scale, sink, window,
    OFF_KEYS, OFF_SURV, OFF_CNT, OFF_INFO,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, T: tl.constexpr, SC: tl.constexpr,
    NBK: tl.constexpr, SK: tl.constexpr, CSB: tl.constexpr, CP: tl.constexpr,
    PAGE: tl.constexpr, PAGE_T: tl.constexpr, WB: tl.constexpr, ZB: tl.constexpr,
    PHASE: tl.constexpr,
):
    # one program per (row = sequence x KV head, chunk of T pages); see the module doc
    row = tl.program_id(0)
    c = tl.program_id(1)
    C = tl.num_programs(1)
    b = row // HKV
    row64 = row.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    start = tl.load(starts_ptr + b).to(tl.int32)  # positions fit in int32
    end = tl.load(ends_ptr + b).to(tl.int32)
    s_end = tl.minimum(start + sink, end)
    w_start = tl.maximum(end - window, start)
    wsr = ws_ptr + row64 * (NBK + 4)
    keys = sc_ptr + OFF_KEYS + row64 * P  # float32 bits
    info = sc_ptr + OFF_INFO + row64 * 4  # k-th key bits, last tied page, mode
    cntw = sc_ptr + OFF_CNT + row64 * C  # tokens kept per chunk, then the chunk's offset
    # the group's log-softmax normalizers and the key range, from the stats
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    mn = tl.full([BLOCK_G], float("inf"), tl.float32)
    z = tl.zeros([BLOCK_G], tl.float32)
    srow = (row64 * GROUP + g)[:, None] * CS
    c0 = 0
    while c0 < CS:
        cc = c0 + tl.arange(0, CSB)
        msk = mg[:, None] & (cc < CS)[None, :]
        mx = tl.load(smax_ptr + srow + cc[None, :], mask=msk, other=float("-inf"))
        mi = tl.load(smin_ptr + srow + cc[None, :], mask=msk, other=float("inf"))
        se = tl.load(ssum_ptr + srow + cc[None, :], mask=msk, other=0.0)
        new = tl.maximum(m, tl.max(mx, axis=1))
        ref = tl.where(new > float("-inf"), new, 0.0)
        part = tl.where(mx > float("-inf"), se * tl.exp(mx - ref[:, None]), 0.0)
        z = z * tl.exp(m - ref) + tl.sum(part, axis=1)
        m = new
        mn = tl.minimum(mn, tl.min(mi, axis=1))
        c0 += CSB
    fin = z > 0.0
    lse = tl.where(fin, m + tl.log(tl.where(fin, z, 1.0)), 0.0)
    hi = tl.max(tl.where(fin, m - lse, float("-inf")), axis=0)
    lo = tl.max(tl.where(fin, mn - lse, float("-inf")), axis=0)
    lo = tl.where(hi > float("-inf"), lo, 0.0)
    hi = tl.where(hi > float("-inf"), hi, 0.0)
    sk = NBK / tl.maximum(hi - lo, 1e-30)
    nbins = tl.arange(0, NBK)

    if PHASE == 1:
        pages = c * T + tl.arange(0, T)
        inb = pages < P
        agg = tl.full([T], float("-inf"), tl.float32)
        for j in tl.static_range(GROUP):
            lsej = tl.sum(tl.where(g == j, lse, 0.0), axis=0)
            x = tl.load(bounds_ptr + (row64 * GROUP + j) * P + pages, mask=inb,
                        other=float("-inf")) * scale
            agg = tl.maximum(agg, tl.where(x > float("-inf"), x - lsej, float("-inf")))
        agg = agg + 0.0  # -0.0 -> +0.0: float order and bit order agree
        tl.store(keys + pages, agg.to(tl.int32, bitcast=True), mask=inb)
        first = pages * PAGE
        last = first + PAGE
        forced = inb & (((first < s_end) & (last > start) & (start < s_end))
                        | ((first < end) & (last > w_start) & (w_start < end)))
        cand = inb & (~forced) & (agg > float("-inf"))
        kb = tl.minimum(tl.maximum((hi - agg) * sk, 0.0), NBK - 1.0).to(tl.int32)
        kb = tl.where(cand, kb, 0)
        hist = tl.histogram(kb, NBK, mask=cand)
        tl.atomic_add(wsr + nbins, hist, mask=hist > 0)
        tl.atomic_add(wsr + NBK, tl.sum(forced.to(tl.int32), axis=0))
        tl.debug_barrier()  # every thread's writes happen before the ticket (release)
        if tl.atomic_add(wsr + NBK + 1, 1) == C - 1:  # the row's last program
            hist_all = tl.load(wsr + nbins, cache_modifier=".cg")
            room = K - tl.load(wsr + NBK, cache_modifier=".cg")
            ncand = tl.sum(hist_all, axis=0)
            mode = tl.where(room <= 0, 0, tl.where(ncand <= room, 1, 2))  # none, all, some
            cum = tl.cumsum(hist_all, axis=0)  # candidates in bins <= b (bin 0 is the best)
            bstar = tl.sum((cum < room).to(tl.int32), axis=0)
            need = room - tl.sum(tl.where(nbins < bstar, hist_all, 0), axis=0)
            nb = tl.sum(tl.where(nbins == bstar, hist_all, 0), axis=0)
            # one scan: tokens of the sure pages per chunk, the boundary bin's pages in order
            run = tl.sum(tl.zeros([CP], tl.int32), axis=0)
            p0 = 0
            while p0 < P:
                pg = p0 + tl.arange(0, SC * T)
                ib = pg < P
                key = tl.load(keys + pg, mask=ib, other=0, cache_modifier=".cg").to(
                    tl.float32, bitcast=True)
                f2 = pg * PAGE
                l2 = f2 + PAGE
                frc = ib & (((f2 < s_end) & (l2 > start) & (start < s_end))
                            | ((f2 < end) & (l2 > w_start) & (w_start < end)))
                cnd = ib & (~frc) & (key > float("-inf"))
                k2 = tl.minimum(tl.maximum((hi - key) * sk, 0.0), NBK - 1.0).to(tl.int32)
                sure = frc | (cnd & ((mode == 1) | ((mode == 2) & (k2 < bstar))))
                ntok = tl.maximum(tl.minimum(l2, end) - tl.maximum(f2, start), 0)
                per = tl.sum(tl.reshape(tl.where(sure, ntok, 0), (SC, T)), axis=1)
                wc = p0 // T + tl.arange(0, SC)
                tl.store(cntw + wc, per, mask=wc < C)
                bnd = cnd & (mode == 2) & (k2 == bstar)
                tl.store(sc_ptr + OFF_SURV + row64 * P + run + tl.cumsum(bnd.to(tl.int32), axis=0)
                         - 1, pg, mask=bnd)
                run += tl.sum(bnd.to(tl.int32), axis=0)
                p0 += SC * T
            tl.debug_barrier()  # the list and the counts are read by other threads below
            kth_bits = tl.sum(tl.zeros([CP], tl.int32), axis=0)
            tiep = kth_bits - 1
            kk = tl.arange(0, SK)
            b256 = tl.arange(0, 256)
            if (mode == 2) & (nb <= SK):  # the boundary bin in registers: no reloads
                mk = kk < nb
                pv = tl.load(sc_ptr + OFF_SURV + row64 * P + kk, mask=mk, other=0,
                             cache_modifier=".cg")
                bits = tl.load(keys + pv, mask=mk, other=0, cache_modifier=".cg")
                uk = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) ^ (-2147483648)
                needr = need
                prefix = kth_bits
                for i in tl.static_range(4):
                    shift = 24 - 8 * i
                    match = mk if i == 0 else mk & (((uk ^ prefix) >> (shift + 8)) == 0)
                    h256 = tl.histogram(tl.where(match, (uk >> shift) & 255, 0), 256, mask=match)
                    at_least = tl.cumsum(h256, axis=0, reverse=True)
                    digit = tl.sum((at_least >= needr).to(tl.int32), axis=0) - 1
                    needr -= tl.sum(tl.where(b256 > digit, h256, 0), axis=0)
                    prefix = prefix | (digit << shift)
                kth = prefix ^ (-2147483648)
                kth_bits = tl.where(kth >= 0, kth, kth ^ 0x7FFFFFFF)
                tie = mk & (bits == kth_bits)
                rank = tl.cumsum(tie.to(tl.int32), axis=0)
                tiep = tl.max(tl.where(tie & (rank <= needr), pv, -1), axis=0)
                chosen = mk & ((bits.to(tl.float32, bitcast=True) > kth_bits.to(
                    tl.float32, bitcast=True)) | (tie & (pv <= tiep)))
                f3 = pv * PAGE
                nt = tl.maximum(tl.minimum(f3 + PAGE, end) - tl.maximum(f3, start), 0)
                tl.atomic_add(cntw + pv // T, nt, mask=chosen)
                tl.debug_barrier()
            if (mode == 2) & (nb > SK):  # streamed from the list, a block at a time
                # the need-th best of the bin: radix select, one byte at a time from the top
                needr = need
                prefix = kth_bits
                for i in tl.static_range(4):
                    shift = 24 - 8 * i
                    h256 = tl.zeros([256], tl.int32)
                    k0 = 0
                    while k0 < nb:
                        mk = (k0 + kk) < nb
                        pv = tl.load(sc_ptr + OFF_SURV + row64 * P + k0 + kk, mask=mk, other=0,
                                     cache_modifier=".cg")
                        bits = tl.load(keys + pv, mask=mk, other=0, cache_modifier=".cg")
                        uk = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) ^ (-2147483648)
                        match = mk if i == 0 else mk & (((uk ^ prefix) >> (shift + 8)) == 0)
                        h256 += tl.histogram(tl.where(match, (uk >> shift) & 255, 0), 256,
                                             mask=match)
                        k0 += SK
                    at_least = tl.cumsum(h256, axis=0, reverse=True)
                    digit = tl.sum((at_least >= needr).to(tl.int32), axis=0) - 1
                    needr -= tl.sum(tl.where(b256 > digit, h256, 0), axis=0)
                    prefix = prefix | (digit << shift)
                kth = prefix ^ (-2147483648)
                kth_bits = tl.where(kth >= 0, kth, kth ^ 0x7FFFFFFF)
                kthf = kth_bits.to(tl.float32, bitcast=True)
                # ties at the k-th key: the first needr in page order (the list is ascending)
                seen = needr - needr
                k0 = 0
                while k0 < nb:
                    mk = (k0 + kk) < nb
                    pv = tl.load(sc_ptr + OFF_SURV + row64 * P + k0 + kk, mask=mk, other=0,
                                 cache_modifier=".cg")
                    bits = tl.load(keys + pv, mask=mk, other=0, cache_modifier=".cg")
                    tie = mk & (bits == kth_bits)
                    rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)
                    tiep = tl.maximum(tiep, tl.max(tl.where(tie & (rank <= needr), pv, -1), axis=0))
                    seen += tl.sum(tie.to(tl.int32), axis=0)
                    k0 += SK
                # the chosen members' tokens join their chunks' counts
                k0 = 0
                while k0 < nb:
                    mk = (k0 + kk) < nb
                    pv = tl.load(sc_ptr + OFF_SURV + row64 * P + k0 + kk, mask=mk, other=0,
                                 cache_modifier=".cg")
                    bits = tl.load(keys + pv, mask=mk, other=0, cache_modifier=".cg")
                    chosen = mk & ((bits.to(tl.float32, bitcast=True) > kthf)
                                   | ((bits == kth_bits) & (pv <= tiep)))
                    f3 = pv * PAGE
                    nt = tl.maximum(tl.minimum(f3 + PAGE, end) - tl.maximum(f3, start), 0)
                    tl.atomic_add(cntw + pv // T, nt, mask=chosen)
                    k0 += SK
                tl.debug_barrier()
            # each chunk's offset: an exclusive prefix of the kept tokens per chunk
            tot = tl.sum(tl.zeros([CP], tl.int32), axis=0)
            c0 = 0
            while c0 < C:
                cq = c0 + tl.arange(0, CP)
                v = tl.load(cntw + cq, mask=cq < C, other=0, cache_modifier=".cg")
                tl.store(cntw + cq, tot + tl.cumsum(v, axis=0) - v, mask=cq < C)
                tot += tl.sum(v, axis=0)
                c0 += CP
            tl.store(counts_ptr + row, tot.to(tl.int64))
            tl.store(info, kth_bits)
            tl.store(info + 1, tiep)
            tl.store(info + 2, mode)

    if PHASE == 2:
        kth_bits = tl.load(info)
        kthf = kth_bits.to(tl.float32, bitcast=True)
        tiep = tl.load(info + 1)
        mode = tl.load(info + 2)
        orow = out_ptr + row64 * CAPT
        j = tl.arange(0, PAGE_T)
        dst0 = tl.load(cntw + c)
        pb = 0
        while pb < T:  # WB pages at a time: [WB, PAGE] positions stay small in registers
            pages = c * T + pb + tl.arange(0, WB)
            inb = pages < P
            key = tl.load(keys + pages, mask=inb, other=0).to(tl.float32, bitcast=True)
            first = pages * PAGE
            last = first + PAGE
            forced = inb & (((first < s_end) & (last > start) & (start < s_end))
                            | ((first < end) & (last > w_start) & (w_start < end)))
            cand = inb & (~forced) & (key > float("-inf"))
            pick = (mode == 1) | ((mode == 2) & ((key > kthf)
                                                 | ((key == kthf) & (pages <= tiep))))
            sel = forced | (cand & pick)
            lo_t = tl.maximum(first, start)
            ntok = tl.where(sel, tl.maximum(tl.minimum(last, end) - lo_t, 0), 0)
            dst = dst0 + tl.cumsum(ntok, axis=0) - ntok
            tok = (lo_t[:, None] + j[None, :]).to(tl.int64)
            tl.store(orow + dst[:, None] + j[None, :], tok, mask=j[None, :] < ntok[:, None])
            dst0 += tl.sum(ntok, axis=0)
            pb += WB
        # this program's share of the zeros after the row's count
        total = tl.load(counts_ptr + row)
        share = tl.cdiv(CAPT, C)
        z1 = tl.minimum(c * share + share, CAPT)
        i = c * share
        while i < z1:
            zz = i + tl.arange(0, ZB)
            tl.store(orow + zz, tl.zeros([ZB], tl.int64), mask=(zz < z1) & (zz >= total))
            i += ZB


def topk_split(bounds: Tensor, num_kv_heads: int, span: KeySpan, page_size: int, k: int,
               sink: int, window: int, scale: float, smax: Tensor, smin: Tensor, ssum: Tensor,
               workspace: Tensor | None, capacity: int) -> tuple[Tensor, Tensor]:
    """Token positions ``[B, Hkv, capacity * page_size]`` and counts ``[B, Hkv]`` of the
    best pages; see :func:`prepare`."""
    launch, out, counts = prepare(bounds, num_kv_heads, span, page_size, k, sink, window,
                                  scale, smax, smin, ssum, workspace, capacity)
    launch(1)
    launch(2)
    return out, counts


def prepare(bounds: Tensor, num_kv_heads: int, span: KeySpan, page_size: int, k: int,
            sink: int, window: int, scale: float, smax: Tensor, smin: Tensor, ssum: Tensor,
            workspace: Tensor | None, capacity: int) -> tuple[Any, Tensor, Tensor]:
    """The buffers of one :func:`topk_split` call and a function launching its phase 1 or
    2 (scripts time them one by one). The token positions ``[B, Hkv, capacity * page_size]``
    and counts ``[B, Hkv]`` of the best pages (the contract of
    :func:`nucleus_attn.ops.pages.topk_pages_reference`, ties by page order).
    ``smax``/``smin``/``ssum`` are ``[B, Hq, CS]`` per-chunk statistics of ``bounds *
    scale``; ``workspace`` is ``B * Hkv * WORKSPACE_PER_ROW`` zeroed int32 (allocated when
    None)."""
    b, hq, p = bounds.shape
    hkv = num_kv_heads
    group = hq // hkv
    rows = b * hkv
    dev = bounds.device
    t, warps = split_plan(rows, p, dev)
    c = cdiv(p, t)
    sc = max(1, SCAN // t)
    capt = capacity * page_size
    sizes = {"keys": rows * p, "surv": rows * p, "cnt": rows * c, "info": rows * 4}
    offs, total = {}, 0
    for name, size in sizes.items():
        offs[name] = total
        total += -(-size // 16) * 16
    scratch = torch.empty(total, dtype=torch.int32, device=dev)
    out = torch.empty(b, hkv, capt, dtype=torch.int64, device=dev)
    counts = torch.empty(b, hkv, dtype=torch.int64, device=dev)
    if workspace is None:
        workspace = torch.zeros(rows * WORKSPACE_PER_ROW, dtype=torch.int32, device=dev)
    cs = smax.shape[-1]

    def launch(phase: int) -> None:
        _topk_split_kernel[(rows, c)](
            bounds, smax, smin, ssum, span.starts, span.ends, workspace, scratch, out, counts,
            hkv, p, min(k, p), cs, capt, float(scale), int(sink), int(window),
            offs["keys"], offs["surv"], offs["cnt"], offs["info"],
            GROUP=group, BLOCK_G=next_pow2(group), T=t, SC=sc, NBK=NBK, SK=LIST_BLOCK,
            CSB=min(STATS_BLOCK, next_pow2(cs)), CP=min(PREFIX_CHUNKS, next_pow2(c)),
            PAGE=page_size,
            PAGE_T=next_pow2(page_size), WB=min(t, max(1, 2048 // next_pow2(page_size))),
            ZB=1024, PHASE=phase, num_warps=warps,
        )
    launch.workspace, launch.scratch, launch.offsets = workspace, scratch, offs  # type: ignore
    return launch, out, counts
