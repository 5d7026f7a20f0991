"""Top-p selection with each row split over many programs (the GPU path for long rows).

One KV head's row of candidates (its G query heads' logits, ``[G, M]``) is cut into C
chunks of ``T`` candidates; every pass below runs one program per (row, chunk), so even a
single sequence with 8 KV heads keeps the whole GPU busy. No pass sorts, none re-reads
the row more than once, and the threshold is exact (the kept set is the reference's, up
to float32 summation order, :mod:`nucleus_attn.ops.topp`).

Per query head j, with ``w = exp(l - m_j)`` (``m_j`` the row max, ``Z_j = sum w``, both
combined from the producer's per-chunk :class:`~nucleus_attn.ops.topp.ScoreStats`), the
threshold t_j is the largest weight with ``mass(w >= t_j) >= p Z_j``. It is bracketed in
two histogram passes, then found exactly among the few weights left in the bracket:

1. **coarse** (phase 1): weights below ``lo0 = (1 - p) Z_j / n`` hold less than 1 - p of
   the mass, so ``t_j >= lo0``; the logits above ``l0 = m_j + log(lo0)`` are binned into
   ``NB1`` equal steps of ``m_j - l`` (equal ratios of w: the range adapts to the row). A
   count histogram per chunk (``tl.histogram``), plus the exact mass of the top
   ``EXACT_BINS`` bins (a few heavy items, such as attention sinks, would otherwise make
   the count bounds loose), written per chunk. The row's last program (ticket) adds the
   chunks up and brackets the crossing bin: a bin's mass lies between its count times its
   lower and upper edge. Each logit's bin is written as one byte (``code``), so the later
   passes read 1 byte per candidate instead of 4.
2. **fine** (phase 2): the exact mass above the bracket, and a count histogram of the
   bracketed items over ``NB2`` finer steps (their code is rewritten to ``128 + fine
   bin``); the last program brackets the crossing again, now from an exact base mass.
3. **survivors** (phase 3): the exact mass above the fine bracket; the weights inside it
   are written, in slot order, to a per-row list (each chunk's offset comes from the
   phase-2 histograms: no atomics, so every float sum below has a fixed order and the
   result is deterministic). Each slot gets a state byte: 1 = kept for sure (forced, sink
   or window, or above some head's bracket), 2 = undecided (inside some head's bracket),
   0 = dropped; the number of sure slots per chunk is written. The last program bisects
   each head's survivors (in registers) for ``t_j``, then walks the survivors head by head
   and claims each undecided slot that some head keeps (state 2 -> 1, counted once for
   the GQA union), and writes each chunk's output offset (an exclusive prefix).
4. **write** (phase 4): kept positions, ascending, at their offsets; zeros after them.

Four launches; the logits are read once (phase 1), the code bytes three times, and the
logits of bracketed items twice. Cross-program results are published through the
"last program of a row finishes the row" pattern: every program writes, then a CTA
barrier and an acq_rel ``atomic_add`` on the row's ticket; the program that draws the
last ticket reads the others' writes with ``.cg`` loads. Nobody waits for anybody.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..span import KeySpan
from ._dispatch import cdiv, interpreting, kernel, next_pow2, num_sms, tl

NB1 = 128  # coarse bins (codes 0..127; 255 = not binned)
NB2 = 64  # fine bins (codes 128..191)
EXACT_BINS = 8  # top bins of each histogram whose mass is summed exactly
NPAR = 16  # per-head parameter slots published by the tails


def _const(x: float) -> float:
    """A module constant a kernel may read (Triton wants globals wrapped as constexpr)."""
    return tl.constexpr(x) if tl is not None else x


# parameter slots (float32 bits; P_BF, P_BL, P_FF, P_FL, P_BASE, P_CNT, P_ALL, P_T: int32)
(P_M, P_Z, P_L0, P_S1, P_BF, P_BL, P_S2, P_FF, P_FL, P_ABOVE, P_BASE, P_CNT, P_LOE, P_HIE,
 P_ALL, P_T) = (_const(i) for i in range(NPAR))
EDGE = _const(1e-5)  # relative widening of every bin edge (float rounding of bins and exps)
CROSS = _const(1e-4)  # relative widening of the target mass when bracketing
TICKETS = 4  # int32 counters per row in the zeroed workspace (phases 1-3 use one each)

# launch settings (chosen per shape by split_plan; measured with
# scripts/tune_selection_kernels.py on an H200, Llama-3-8B heads, 128k tokens: 4 warps and
# chunks of 512-1024 were fastest at B=1 and B=8, in index and range mode)
MIN_CHUNK = 512
MAX_CHUNK = 1024  # ([G, T] survivors and [T] tiles stay in registers at 4 warps)
PROGRAMS_PER_SM = 4  # chunks per row are chosen to give about this many programs per SM
SPLIT_MIN_M = 4096  # rows shorter than this take the one-program-per-row kernel
SURVIVORS_IN_REGISTERS = 2048  # survivors of a row (all heads) bisected without reloading
# block sizes of the tails' loops (chunks per load, survivors per load, stats per load)
TAIL_CHUNKS = 16
PREFIX_CHUNKS = 1024
UNION_BLOCK = 512
STATS_BLOCK = 512


def split_wanted(m: int, query_rows: int | None = None, range_mode: bool = False,
                 device: torch.device | None = None) -> bool:
    """Whether rows of ``m`` candidates take the split kernel rather than the row kernel of
    :mod:`~nucleus_attn.ops.topp` (one program per query head, bisection in registers).

    Below ``SPLIT_MIN_M`` a row is short enough for one program. Above it the split kernel
    wins while the row kernel would leave SMs idle: measured on an H200 at 128k tokens
    (index mode, 32k candidates), split 82 us vs row 115 us at B=1 (32 query-head rows),
    row 235 us vs split 262 us at B=8 (256 rows); so index-list rows split when there are
    at most as many query-head rows as SMs. Range mode always splits (its row path first
    compacts the valid positions: 611 vs 170 us at B=1, 1641 vs 870 us at B=8).
    """
    if m < SPLIT_MIN_M:
        return False
    if range_mode or query_rows is None:
        return True
    sms = num_sms(device) if device is not None else 132
    return query_rows <= sms


def split_plan(rows: int, m: int, device: torch.device) -> tuple[int, int]:
    """(chunk ``T``, warps) for ``rows`` KV-head rows of ``m`` candidates: enough chunks per
    row for ``PROGRAMS_PER_SM`` programs per SM, each chunk a power of two in
    [``MIN_CHUNK``, ``MAX_CHUNK``] (a power of two: no recompilation as M grows)."""
    want = max(1, cdiv(PROGRAMS_PER_SM * num_sms(device), max(rows, 1)))
    t = next_pow2(cdiv(m, want))
    t = max(MIN_CHUNK, min(MAX_CHUNK, t))
    if interpreting():
        t = min(t, next_pow2(max(m, 16)))
    return t, 4


@kernel(do_not_specialize=("CS", "C"))
def _topp_split_kernel(
    x_ptr, smax_ptr, ssum_ptr, idx_ptr, counts_ptr, forced_ptr, starts_ptr, ends_ptr,
    ws_ptr, sc_ptr, u8_ptr, sw_ptr, ss_ptr, kept_ptr, kept_counts_ptr,
    stride_ib, stride_ih, stride_fb, stride_fh, HKV, M, CS, C, p, sink, window,
    OFF_T1, OFF_H2, OFF_P1, OFF_P2, OFF_SO, OFF_PAR, OFF_CNT, OFF_OFS, STATE_OFF,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, T: tl.constexpr, CSB: tl.constexpr,
    CB: tl.constexpr, CP: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr,
    E: tl.constexpr, SREG: tl.constexpr, SU: tl.constexpr, PHASE: tl.constexpr,
    RANGE: tl.constexpr, HAS_FORCED: tl.constexpr, HAS_SPAN: tl.constexpr,
    EXACT_EXP: tl.constexpr,
):
    # one program per (row = sequence x KV head, chunk of T candidates); see the module doc.
    # The main parts go head by head over [T] tiles (few registers, so many programs per
    # SM) with no branches (the heads' loads can overlap); the tails work on all heads at
    # once ([BLOCK_G, ...] tiles: one load, one reduction for every head).
    # (while loops: the 3.6 interpreter cannot run range(runtime int))
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    row64 = row.to(tl.int64)
    q0 = row64 * GROUP  # the row's first query head, b * Hq + h * GROUP
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    offs = tl.arange(0, T)
    slot = c * T + offs
    inm = slot < M
    if RANGE:  # candidate j is position j, live inside the sequence's span
        start = tl.load(starts_ptr + b)
        end = tl.load(ends_ptr + b)
        live = inm & (slot >= start) & (slot < end)
        n_live = (end - start).to(tl.int32)
    else:
        n_live = tl.minimum(tl.load(counts_ptr + row), M).to(tl.int32)
        live = slot < n_live
    pv = sc_ptr + OFF_PAR + row64 * (GROUP * 16) + g * 16  # per-head parameters [BLOCK_G]
    wsr = ws_ptr + row64 * (4 + GROUP * NB1)  # zeroed: 4 tickets, the coarse histograms
    state_row = u8_ptr + STATE_OFF + row64 * M
    cnt_row = sc_ptr + OFF_CNT + row64 * C
    sbase = row64 * (GROUP * M)  # the row's survivors list
    pc = (row64 * C + c) * GROUP + g  # this chunk's per-head slots [BLOCK_G]

    if PHASE == 1:
        # the row's max and total per query head, from the producer's per-chunk stats
        # (every program combines them in the same order: identical values everywhere)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK_G], tl.float32)
        srow = (q0 + g)[:, None] * CS
        c0 = 0
        while c0 < CS:
            cc = c0 + tl.arange(0, CSB)
            msk = mg[:, None] & (cc < CS)[None, :]
            mx = tl.load(smax_ptr + srow + cc[None, :], mask=msk, other=float("-inf"))
            se = tl.load(ssum_ptr + srow + cc[None, :], mask=msk, other=0.0)
            mn = tl.maximum(m, tl.max(mx, axis=1))
            ref = tl.where(mn > float("-inf"), mn, 0.0)
            part = tl.where(mx > float("-inf"), se * tl.exp(mx - ref[:, None]), 0.0)
            z = z * tl.exp(m - ref) + tl.sum(part, axis=1)
            m = mn
            c0 += CSB
        m = tl.where(m > float("-inf"), m, 0.0)
        allk = z <= 0.0  # no live finite logit: every live candidate is kept (w = 0 >= t = 0)
        lo0 = (1.0 - p) * z / tl.maximum(n_live, 1).to(tl.float32)
        l0 = tl.where(allk, float("inf"), m + tl.log(tl.maximum(lo0, 1e-30)) - 1e-3)
        s1 = NB1 / tl.where(allk, NB1, m - l0)
        # phase 2 counts this chunk's fine bins into this slice: zero it first
        nz = tl.arange(0, BLOCK_G * NB2)
        tl.store(sc_ptr + OFF_H2 + (row64 * C + c) * (GROUP * NB2) + nz,
                 tl.zeros([BLOCK_G * NB2], tl.int32), mask=nz < GROUP * NB2)
        nb = tl.arange(0, NB1)
        for j in tl.static_range(GROUP):  # (no branches: loads of all heads can overlap)
            mj = tl.sum(tl.where(g == j, m, 0.0), axis=0)
            l0j = tl.max(tl.where(g == j, l0, float("-inf")), axis=0)
            s1j = tl.sum(tl.where(g == j, s1, 0.0), axis=0)
            x = tl.load(x_ptr + (q0 + j) * M + slot, mask=live, other=float("-inf"))
            binned = live & (x >= l0j)
            b1 = tl.minimum(tl.maximum((mj - x) * s1j, 0.0), NB1 - 1.0).to(tl.int32)
            b1 = tl.where(binned, b1, 0)
            tl.store(u8_ptr + (q0 + j) * M + slot, tl.where(binned, b1, 255).to(tl.uint8),
                     mask=inm)
            hist = tl.histogram(b1, NB1, mask=binned)
            tl.atomic_add(wsr + 4 + j * NB1 + nb, hist, mask=hist > 0)
            # the exact mass of the top E bins (a few heavy items, such as sinks, there)
            w = libdevice.exp(x - mj) if EXACT_EXP else tl.exp(x - mj)
            tm = tl.sum(tl.where(binned & (b1 < E), w, 0.0), axis=0)
            tl.store(sc_ptr + OFF_T1 + (row64 * C + c) * GROUP + j, tm.to(tl.int32, bitcast=True))
        tl.debug_barrier()  # every thread's writes happen before the ticket (release)
        if tl.atomic_add(wsr, 1) == C - 1:  # the row's last program: coarse brackets
            hb = tl.load(wsr + 4 + g[:, None] * NB1 + nb[None, :], mask=mg[:, None], other=0,
                         cache_modifier=".cg")
            tmass = tl.zeros([BLOCK_G], tl.float32)
            c0 = 0
            while c0 < C:
                ch = c0 + tl.arange(0, CB)
                tt = tl.load(sc_ptr + OFF_T1 + (row64 * C + ch[:, None]) * GROUP + g[None, :],
                             mask=(ch < C)[:, None] & mg[None, :], other=0, cache_modifier=".cg")
                tmass += tl.sum(tt.to(tl.float32, bitcast=True), axis=0)
                c0 += CB
            fb = nb.to(tl.float32)[None, :]
            up = tl.exp(-fb / s1[:, None]) * (1.0 + EDGE)
            lo = tl.exp(-(fb + 1.0) / s1[:, None]) * (1.0 - EDGE)
            cnt = hb.to(tl.float32)
            c_hi = tl.cumsum(cnt * up, axis=1)
            c_lo = tl.cumsum(cnt * lo, axis=1)
            # the top E bins' total is exact: the bounds from there on start from it, and
            # those inside it cannot pass it
            t_hi = (tmass * (1.0 + EDGE))[:, None]
            t_lo = (tmass * (1.0 - EDGE))[:, None]
            at = (nb == E - 1)[None, :]
            h_at = tl.sum(tl.where(at, c_hi, 0.0), axis=1)[:, None]
            l_at = tl.sum(tl.where(at, c_lo, 0.0), axis=1)[:, None]
            past = (nb >= E - 1)[None, :]
            a_hi = tl.where(past, t_hi + c_hi - h_at, tl.minimum(c_hi, t_hi))
            a_lo = tl.where(past, t_lo + c_lo - l_at, c_lo)
            target = (p * z)[:, None]
            bl = tl.minimum(tl.sum((a_lo < target * (1.0 + CROSS)).to(tl.int32), axis=1),
                            NB1 - 1)
            bf = tl.minimum(tl.sum((a_hi < target * (1.0 - CROSS)).to(tl.int32), axis=1), bl)
            tl.store(pv + P_M, m.to(tl.int32, bitcast=True), mask=mg)
            tl.store(pv + P_Z, z.to(tl.int32, bitcast=True), mask=mg)
            tl.store(pv + P_L0, l0.to(tl.int32, bitcast=True), mask=mg)
            tl.store(pv + P_S1, s1.to(tl.int32, bitcast=True), mask=mg)
            tl.store(pv + P_BF, bf, mask=mg)
            tl.store(pv + P_BL, bl, mask=mg)
            s2 = NB2 / (bl + 1 - bf).to(tl.float32)
            tl.store(pv + P_S2, s2.to(tl.int32, bitcast=True), mask=mg)
            tl.store(pv + P_ALL, allk.to(tl.int32), mask=mg)

    if PHASE == 2:
        m = tl.load(pv + P_M, mask=mg, other=0).to(tl.float32, bitcast=True)
        s1 = tl.load(pv + P_S1, mask=mg, other=0).to(tl.float32, bitcast=True)
        s2 = tl.load(pv + P_S2, mask=mg, other=0).to(tl.float32, bitcast=True)
        bf = tl.load(pv + P_BF, mask=mg, other=0)
        bl = tl.load(pv + P_BL, mask=mg, other=-1)
        pa = tl.zeros([BLOCK_G], tl.float32)
        for j in tl.static_range(GROUP):  # head by head: [T] tiles keep registers few
            mj = tl.sum(tl.where(g == j, m, 0.0), axis=0)
            s1j = tl.sum(tl.where(g == j, s1, 0.0), axis=0)
            s2j = tl.sum(tl.where(g == j, s2, 0.0), axis=0)
            bfj = tl.sum(tl.where(g == j, bf, 0), axis=0)
            blj = tl.sum(tl.where(g == j, bl, 0), axis=0)
            code = tl.load(u8_ptr + (q0 + j) * M + slot, mask=inm, other=255).to(tl.int32)
            binned = code < 255
            above = binned & (code < bfj)
            inb = binned & (code >= bfj) & (code <= blj)
            x = tl.load(x_ptr + (q0 + j) * M + slot, mask=above | inb, other=0.0)
            d = ((mj - x) * s1j - bfj.to(tl.float32)) * s2j
            f = tl.where(inb, tl.minimum(tl.maximum(d, 0.0), NB2 - 1.0).to(tl.int32), 0)
            tl.store(u8_ptr + (q0 + j) * M + slot, (128 + f).to(tl.uint8), mask=inb)
            # the bracketed items (a few per cent of the row) count into this chunk's bins
            tl.atomic_add(sc_ptr + OFF_H2 + ((row64 * C + c) * GROUP + j) * NB2 + f,
                          tl.full([T], 1, tl.int32), mask=inb)
            w = libdevice.exp(x - mj) if EXACT_EXP else tl.exp(x - mj)
            pa = tl.where(g == j, tl.sum(tl.where(above, w, 0.0), axis=0), pa)
        tl.store(sc_ptr + OFF_P1 + pc, pa.to(tl.int32, bitcast=True), mask=mg)
        tl.debug_barrier()
        if tl.atomic_add(wsr + 1, 1) == C - 1:  # the row's last program: fine brackets
            nf = tl.arange(0, NB2)
            tot = tl.zeros([BLOCK_G, NB2], tl.int32)
            abv = tl.zeros([BLOCK_G], tl.float32)
            hoff = (g[None, :, None] * NB2 + nf[None, None, :])
            c0 = 0
            while c0 < C:
                ch = c0 + tl.arange(0, CB)
                mc = ch < C
                hh = tl.load(sc_ptr + OFF_H2 + (row64 * C + ch[:, None, None]) * (GROUP * NB2)
                             + hoff, mask=mc[:, None, None] & mg[None, :, None], other=0,
                             cache_modifier=".cg")
                tot += tl.sum(hh, axis=0)
                pp = tl.load(sc_ptr + OFF_P1 + (row64 * C + ch[:, None]) * GROUP + g[None, :],
                             mask=mc[:, None] & mg[None, :], other=0, cache_modifier=".cg")
                abv += tl.sum(pp.to(tl.float32, bitcast=True), axis=0)
                c0 += CB
            z = tl.load(pv + P_Z, mask=mg, other=0).to(tl.float32, bitcast=True)
            bff = bf.to(tl.float32)[:, None]
            ff = nf.to(tl.float32)[None, :]
            up = tl.exp(-(bff + ff / s2[:, None]) / s1[:, None]) * (1.0 + EDGE)
            lo = tl.exp(-(bff + (ff + 1.0) / s2[:, None]) / s1[:, None]) * (1.0 - EDGE)
            cnt = tot.to(tl.float32)
            a_hi = abv[:, None] + tl.cumsum(cnt * up, axis=1)
            a_lo = abv[:, None] + tl.cumsum(cnt * lo, axis=1)
            target = (p * z)[:, None]
            fl = tl.minimum(tl.sum((a_lo < target * (1.0 + CROSS)).to(tl.int32), axis=1), NB2 - 1)
            fr = tl.minimum(tl.sum((a_hi < target * (1.0 - CROSS)).to(tl.int32), axis=1), fl)
            band = (nf[None, :] >= fr[:, None]) & (nf[None, :] <= fl[:, None])
            n_surv = tl.where(mg, tl.sum(tl.where(band, tot, 0), axis=1), 0)
            base = tl.cumsum(n_surv, axis=0) - n_surv
            # each chunk's survivors of head j start after the earlier chunks' (phase 3)
            run = base
            c0 = 0
            while c0 < C:
                ch = c0 + tl.arange(0, CB)
                mc = ch < C
                hh = tl.load(sc_ptr + OFF_H2 + (row64 * C + ch[:, None, None]) * (GROUP * NB2)
                             + hoff, mask=mc[:, None, None] & band[None, :, :], other=0,
                             cache_modifier=".cg")
                per = tl.sum(hh, axis=2)  # [CB, BLOCK_G]
                tl.store(sc_ptr + OFF_SO + (row64 * C + ch[:, None]) * GROUP + g[None, :],
                         run[None, :] + tl.cumsum(per, axis=0) - per,
                         mask=mc[:, None] & mg[None, :])
                run += tl.sum(per, axis=0)
                c0 += CB
            loe = tl.exp(-(bf.to(tl.float32) + (fl + 1).to(tl.float32) / s2) / s1) * 0.999
            hie = tl.exp(-(bf.to(tl.float32) + fr.to(tl.float32) / s2) / s1) * 1.001
            tl.store(pv + P_FF, fr, mask=mg)
            tl.store(pv + P_FL, fl, mask=mg)
            tl.store(pv + P_ABOVE, abv.to(tl.int32, bitcast=True), mask=mg)
            tl.store(pv + P_BASE, base, mask=mg)
            tl.store(pv + P_CNT, n_surv, mask=mg)
            tl.store(pv + P_LOE, loe.to(tl.int32, bitcast=True), mask=mg)
            tl.store(pv + P_HIE, hie.to(tl.int32, bitcast=True), mask=mg)

    if PHASE == 3:
        m = tl.load(pv + P_M, mask=mg, other=0).to(tl.float32, bitcast=True)
        bf = tl.load(pv + P_BF, mask=mg, other=0)
        fr = tl.load(pv + P_FF, mask=mg, other=0)
        fl = tl.load(pv + P_FL, mask=mg, other=-1)
        allk = tl.load(pv + P_ALL, mask=mg, other=0)
        so = tl.load(sc_ptr + OFF_SO + pc, mask=mg, other=0)
        sure = slot < 0
        unsure = slot < 0
        pa = tl.zeros([BLOCK_G], tl.float32)
        for j in tl.static_range(GROUP):  # head by head: [T] tiles keep registers few
            mj = tl.sum(tl.where(g == j, m, 0.0), axis=0)
            bfj = tl.sum(tl.where(g == j, bf, 0), axis=0)
            frj = tl.sum(tl.where(g == j, fr, 0), axis=0)
            flj = tl.sum(tl.where(g == j, fl, 0), axis=0)
            code = tl.load(u8_ptr + (q0 + j) * M + slot, mask=inm, other=255).to(tl.int32)
            fine = (code >= 128) & (code < 255)
            f = code - 128
            above_f = fine & (f < frj)
            surv = fine & (f >= frj) & (f <= flj)
            sure = sure | (code < bfj) | above_f
            unsure = unsure | surv
            x = tl.load(x_ptr + (q0 + j) * M + slot, mask=above_f | surv, other=0.0)
            w = libdevice.exp(x - mj) if EXACT_EXP else tl.exp(x - mj)
            pa = tl.where(g == j, tl.sum(tl.where(above_f, w, 0.0), axis=0), pa)
            # survivors of head j: after the earlier chunks' (offsets from phase 2), in order
            dst = (tl.sum(tl.where(g == j, so, 0), axis=0) + tl.cumsum(surv.to(tl.int32), axis=0)
                   - 1)
            tl.store(sw_ptr + sbase + dst, w, mask=surv)
            tl.store(ss_ptr + sbase + dst, slot, mask=surv)
        tl.store(sc_ptr + OFF_P2 + pc, pa.to(tl.int32, bitcast=True), mask=mg)
        sure = sure | (live & (tl.max(allk, axis=0) != 0))
        if HAS_FORCED:
            fbase = forced_ptr + b.to(tl.int64) * stride_fb + h.to(tl.int64) * stride_fh
            sure = sure | (tl.load(fbase + slot, mask=live, other=0) != 0)
        if HAS_SPAN:
            s0 = tl.load(starts_ptr + b)
            s1e = tl.load(ends_ptr + b)
            if RANGE:
                pos = slot.to(tl.int64)
            else:
                ibase = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
                pos = tl.load(ibase + slot, mask=live, other=-1).to(tl.int64)
            near = (pos < s0 + sink) | (pos >= s1e - window)
            sure = sure | ((pos >= s0) & (pos < s1e) & near)
        sure = sure & live
        unsure = unsure & live & (~sure)
        state = tl.where(sure, 1, tl.where(unsure, 2, 0))
        tl.store(state_row + slot, state.to(tl.uint8), mask=inm)
        tl.store(cnt_row + c, tl.sum(sure.to(tl.int32), axis=0))
        tl.debug_barrier()
        if tl.atomic_add(wsr + 2, 1) == C - 1:  # the row's last program: thresholds, union
            z = tl.load(pv + P_Z, mask=mg, other=0).to(tl.float32, bitcast=True)
            cnt = tl.load(pv + P_CNT, mask=mg, other=0)
            base = tl.load(pv + P_BASE, mask=mg, other=0)
            above = tl.load(pv + P_ABOVE, mask=mg, other=0).to(tl.float32, bitcast=True)
            c0 = 0
            while c0 < C:
                ch = c0 + tl.arange(0, CB)
                part = tl.load(sc_ptr + OFF_P2 + (row64 * C + ch[:, None]) * GROUP + g[None, :],
                               mask=(ch < C)[:, None] & mg[None, :], other=0,
                               cache_modifier=".cg")
                above += tl.sum(part.to(tl.float32, bitcast=True), axis=0)
                c0 += CB
            target = p * z
            lo = tl.load(pv + P_LOE, mask=mg, other=0)  # bit patterns of the bounds
            hi = tl.minimum(tl.load(pv + P_HIE, mask=mg, other=0), 0x3F800000) + 1
            lo = tl.minimum(tl.maximum(lo, 0), hi - 1)
            hi = tl.where(mg, hi, lo + 1)
            k = tl.arange(0, SREG)
            most = tl.max(cnt, axis=0)
            msk = mg[:, None] & (k[None, :] < cnt[:, None])
            if most <= SREG:  # all survivors in registers: bisect, then claim, no reloads
                ws = tl.load(sw_ptr + sbase + base[:, None] + k[None, :], mask=msk, other=0.0,
                             cache_modifier=".cg")
                sv = tl.load(ss_ptr + sbase + base[:, None] + k[None, :], mask=msk, other=0,
                             cache_modifier=".cg")
                while tl.max(hi - lo, axis=0) > 1:
                    mid = lo + (hi - lo) // 2
                    t = mid.to(tl.float32, bitcast=True)
                    ok = above + tl.sum(tl.where(ws >= t[:, None], ws, 0.0), axis=1) >= target
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid)
                thr = lo.to(tl.float32, bitcast=True)
                kept = msk & (ws >= thr[:, None])
                for j in tl.static_range(GROUP):  # the GQA union: one claim per slot
                    kj = kept & (g == j)[:, None]
                    st = tl.load(state_row + sv, mask=kj, other=0, cache_modifier=".cg")
                    claim = kj & (st == 2)
                    tl.store(state_row + sv, tl.full([BLOCK_G, SREG], 1, tl.uint8), mask=claim)
                    tl.atomic_add(cnt_row + sv // T, tl.full([BLOCK_G, SREG], 1, tl.int32),
                                  mask=claim)
                    tl.debug_barrier()  # this head's claims are seen by the next head's loads
            else:  # streamed from the list
                while tl.max(hi - lo, axis=0) > 1:
                    mid = lo + (hi - lo) // 2
                    t = mid.to(tl.float32, bitcast=True)
                    acc = tl.zeros([BLOCK_G], tl.float32)
                    k0 = 0
                    while k0 < most:
                        mk = mg[:, None] & ((k0 + k)[None, :] < cnt[:, None])
                        ws = tl.load(sw_ptr + sbase + base[:, None] + k0 + k[None, :], mask=mk,
                                     other=0.0, cache_modifier=".cg")
                        acc += tl.sum(tl.where(ws >= t[:, None], ws, 0.0), axis=1)
                        k0 += SREG
                    ok = above + acc >= target
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid)
                thr = lo.to(tl.float32, bitcast=True)
                ku = tl.arange(0, SU)
                for j in tl.static_range(GROUP):
                    tj = tl.sum(tl.where(g == j, thr, 0.0), axis=0)
                    cj = tl.sum(tl.where(g == j, cnt, 0), axis=0)
                    bj = tl.sum(tl.where(g == j, base, 0), axis=0)
                    k0 = 0
                    while k0 < cj:
                        mk = (k0 + ku) < cj
                        wv = tl.load(sw_ptr + sbase + bj + k0 + ku, mask=mk, other=0.0,
                                     cache_modifier=".cg")
                        su = tl.load(ss_ptr + sbase + bj + k0 + ku, mask=mk, other=0,
                                     cache_modifier=".cg")
                        kj = mk & (wv >= tj)
                        st = tl.load(state_row + su, mask=kj, other=0, cache_modifier=".cg")
                        claim = kj & (st == 2)
                        tl.store(state_row + su, tl.full([SU], 1, tl.uint8), mask=claim)
                        tl.atomic_add(cnt_row + su // T, tl.full([SU], 1, tl.int32), mask=claim)
                        k0 += SU
                    tl.debug_barrier()
            tl.store(pv + P_T, thr.to(tl.int32, bitcast=True), mask=mg)
            # each chunk's output offset: an exclusive prefix of the kept counts
            run = tl.sum(tl.zeros([CP], tl.int32), axis=0)
            c0 = 0
            while c0 < C:
                cq = c0 + tl.arange(0, CP)
                v = tl.load(cnt_row + cq, mask=cq < C, other=0, cache_modifier=".cg")
                tl.store(sc_ptr + OFF_OFS + row64 * C + cq, run + tl.cumsum(v, axis=0) - v,
                         mask=cq < C)
                run += tl.sum(v, axis=0)
                c0 += CP
            tl.store(kept_counts_ptr + row, run.to(tl.int64))

    if PHASE == 4:
        keep = tl.load(state_row + slot, mask=inm, other=0) == 1
        dst = tl.load(sc_ptr + OFF_OFS + row64 * C + c) + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        if RANGE:
            pos = slot.to(tl.int64)
        else:
            ibase = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
            pos = tl.load(ibase + slot, mask=keep, other=0).to(tl.int64)
        out = kept_ptr + row64 * M
        tl.store(out + dst, pos, mask=keep)
        total = tl.load(kept_counts_ptr + row)
        tl.store(out + slot, tl.zeros_like(pos), mask=inm & (slot >= total))


if tl is not None:  # libdevice math (the interpreter runs numpy's instead)
    from triton.language.extra import libdevice
else:  # pragma: no cover
    libdevice = None


def workspace_numel(rows: int, group: int) -> int:
    """int32 the split kernel needs zeroed (a producer may zero them for it): per row, the
    tickets and the coarse histograms of its ``group`` query heads."""
    return rows * (TICKETS + group * NB1)


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def topp_split(
    logits: Tensor, num_kv_heads: int, p: float, smax: Tensor, ssum: Tensor,
    workspace: Tensor | None, *, indices: Tensor | None = None, counts: Tensor | None = None,
    forced: Tensor | None = None, span: KeySpan | None = None, sink: int = 0, window: int = 0,
) -> tuple[Tensor, Tensor]:
    """Kept positions ``[B, Hkv, M]`` and counts ``[B, Hkv]`` (the contract of
    :func:`nucleus_attn.ops.topp.topp_select_reference`, or of its range form when
    ``indices`` is None: candidate j is position j, live inside ``span``).

    ``smax``/``ssum`` are ``[B, Hq, CS]`` per-chunk statistics of the logits (any chunk
    size), ``workspace`` ``workspace_numel(B * Hkv, Hq // Hkv)`` zeroed int32 (allocated
    when None).
    Requires ``p < 1``.
    """
    launch, kept, kept_counts = prepare(logits, num_kv_heads, p, smax, ssum, workspace,
                                        indices=indices, counts=counts, forced=forced,
                                        span=span, sink=sink, window=window)
    for phase in (1, 2, 3, 4):
        launch(phase)
    return kept, kept_counts


def prepare(
    logits: Tensor, num_kv_heads: int, p: float, smax: Tensor, ssum: Tensor,
    workspace: Tensor | None, *, indices: Tensor | None = None, counts: Tensor | None = None,
    forced: Tensor | None = None, span: KeySpan | None = None, sink: int = 0, window: int = 0,
) -> tuple[Callable[[int], None], Tensor, Tensor]:
    """The buffers of one :func:`topp_split` call and a function launching phase 1..4 of it
    (what :func:`topp_split` runs in order; scripts time the phases one by one)."""
    b, hq, m = logits.shape
    hkv = num_kv_heads
    group = hq // hkv
    rows = b * hkv
    dev = logits.device
    range_mode = indices is None
    t, warps = split_plan(rows, m, dev)
    c = cdiv(m, t)
    cs = smax.shape[-1]
    block_g = next_pow2(group)
    per_row = [("t1", c * group), ("h2", c * group * NB2), ("p1", c * group),
               ("p2", c * group), ("so", c * group), ("par", group * NPAR), ("cnt", c),
               ("ofs", c)]
    offs: dict[str, int] = {}
    total = 0
    for name, size in per_row:
        offs[name] = total
        total += _pad16(rows * size)
    scratch = torch.empty(total, dtype=torch.int32, device=dev)
    u8 = torch.empty(rows * group * m + rows * m, dtype=torch.uint8, device=dev)
    surv_w = torch.empty(rows * group * m, dtype=torch.float32, device=dev)
    surv_s = torch.empty(rows * group * m, dtype=torch.int32, device=dev)
    kept = torch.empty(b, hkv, m, dtype=torch.int64, device=dev)
    kept_counts = torch.empty(b, hkv, dtype=torch.int64, device=dev)
    if workspace is None:
        workspace = torch.zeros(workspace_numel(rows, group), dtype=torch.int32, device=dev)
    has_span = span is not None and bool(sink or window)
    if range_mode:
        idx, cnt, istr = kept_counts, kept_counts, (0, 0)
    else:
        idx = indices if indices.stride(-1) == 1 else indices.contiguous()
        cnt = counts.contiguous()
        istr = (idx.stride(0), idx.stride(1))
    if forced is not None and forced.stride(-1) != 1:
        forced = forced.contiguous()
    fstr = (forced.stride(0), forced.stride(1)) if forced is not None else (0, 0)
    starts = span.starts if span is not None else kept_counts
    ends = span.ends if span is not None else kept_counts
    sreg = max(16, SURVIVORS_IN_REGISTERS // block_g)

    def launch(phase: int) -> None:
        _topp_split_kernel[(rows, c)](
            logits, smax, ssum, idx, cnt, forced if forced is not None else kept_counts,
            starts, ends, workspace, scratch, u8, surv_w, surv_s, kept, kept_counts,
            *istr, *fstr, hkv, m, cs, c, float(p), int(sink), int(window),
            offs["t1"], offs["h2"], offs["p1"], offs["p2"], offs["so"], offs["par"],
            offs["cnt"], offs["ofs"], rows * group * m,
            GROUP=group, BLOCK_G=block_g, T=t, CSB=min(STATS_BLOCK, next_pow2(cs)),
            CB=min(TAIL_CHUNKS, next_pow2(c)), CP=min(PREFIX_CHUNKS, next_pow2(c)), NB1=NB1,
            NB2=NB2, E=EXACT_BINS, SREG=sreg, SU=UNION_BLOCK, PHASE=phase, RANGE=range_mode,
            HAS_FORCED=forced is not None, HAS_SPAN=has_span, EXACT_EXP=not interpreting(),
            num_warps=warps,
        )
    launch.workspace, launch.scratch, launch.offsets = workspace, scratch, offs  # type: ignore
    return launch, kept, kept_counts
