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

# launch settings (chosen per shape by split_plan; tuned by scripts/tune_selection_kernels.py)
MIN_CHUNK = 512
MAX_CHUNK = 4096
PROGRAMS_PER_SM = 2  # chunks per row are chosen to give about this many programs per SM
SPLIT_MIN_M = 4096  # rows shorter than this take the one-program-per-row kernel
SURVIVORS_IN_REGISTERS = 4096  # survivors of a row (all heads) bisected without reloading
# block sizes of the tails' loops (chunks per load, survivors per load, stats per load)
TAIL_CHUNKS = 64
PREFIX_CHUNKS = 1024
UNION_BLOCK = 512
STATS_BLOCK = 256


def split_wanted(m: int) -> bool:
    """Whether rows of ``m`` candidates take the split kernel.

    Below ``SPLIT_MIN_M`` the row kernel of :mod:`~nucleus_attn.ops.topp` (one program per
    query head, bisection in registers, 3 launches) has fewer launches than the split
    path's 4 and rows short enough that one program is not latency-bound.
    """
    return m >= SPLIT_MIN_M


def split_plan(rows: int, m: int, device: torch.device) -> tuple[int, int]:
    """(chunk ``T``, warps) for ``rows`` KV-head rows of ``m`` candidates: enough chunks per
    row for ``PROGRAMS_PER_SM`` programs per SM, each chunk a power of two in
    [``MIN_CHUNK``, ``MAX_CHUNK``] (a power of two: no recompilation as M grows)."""
    want = max(1, cdiv(PROGRAMS_PER_SM * num_sms(device), max(rows, 1)))
    t = next_pow2(cdiv(m, want))
    t = max(MIN_CHUNK, min(MAX_CHUNK, t))
    if interpreting():
        t = min(t, next_pow2(max(m, 16)))
    return t, 4 if t <= 2048 else 8


@kernel(do_not_specialize=("CS", "C"))
def _topp_split_kernel(
    x_ptr, smax_ptr, ssum_ptr, idx_ptr, counts_ptr, forced_ptr, starts_ptr, ends_ptr,
    tick_ptr, sc_ptr, u8_ptr, sw_ptr, ss_ptr, kept_ptr, kept_counts_ptr,
    stride_ib, stride_ih, stride_fb, stride_fh, HKV, M, CS, C, p, sink, window,
    OFF_H1, OFF_T1, OFF_H2, OFF_T2, OFF_P1, OFF_P2, OFF_PAR, OFF_CNT, OFF_OFS, STATE_OFF,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, T: tl.constexpr, CSB: tl.constexpr,
    CB: tl.constexpr, CP: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr,
    E: tl.constexpr, SREG: tl.constexpr, SU: tl.constexpr, PHASE: tl.constexpr,
    RANGE: tl.constexpr, HAS_FORCED: tl.constexpr, HAS_SPAN: tl.constexpr,
    EXACT_EXP: tl.constexpr,
):
    # one program per (row = sequence x KV head, chunk of T candidates); see the module doc
    # (while loops: the 3.6 interpreter cannot run range(runtime int))
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    row64 = row.to(tl.int64)
    q0 = row64 * GROUP  # the row's first query head, b * Hq + h * GROUP
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    e = tl.arange(0, E)
    slot = c * T + tl.arange(0, T)
    inm = slot < M
    if RANGE:  # candidate j is position j, live inside the sequence's span
        start = tl.load(starts_ptr + b)
        end = tl.load(ends_ptr + b)
        live = inm & (slot >= start) & (slot < end)
        n_live = (end - start).to(tl.int32)
    else:
        n_live = tl.minimum(tl.load(counts_ptr + row), M).to(tl.int32)
        live = slot < n_live
    par = sc_ptr + OFF_PAR + row64 * (GROUP * 16)
    tick = tick_ptr + row64 * 4
    crows = u8_ptr + q0 * M  # code bytes of the row's query heads
    xrows = x_ptr + q0 * M
    state_row = u8_ptr + STATE_OFF + row64 * M
    cnt_row = sc_ptr + OFF_CNT + row64 * C
    sbase = row64 * (GROUP * M)  # the row's survivors list

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
        for j in tl.static_range(GROUP):
            mj = tl.sum(tl.where(g == j, m, 0.0), axis=0)
            l0j = tl.max(tl.where(g == j, l0, float("-inf")), axis=0)
            s1j = tl.sum(tl.where(g == j, s1, 0.0), axis=0)
            x = tl.load(xrows + j * M + slot, mask=live, other=float("-inf"))
            binned = live & (x >= l0j)
            d1 = (mj - x) * s1j
            b1 = tl.minimum(tl.maximum(d1, 0.0), NB1 - 1.0).to(tl.int32)
            b1 = tl.where(binned, b1, 0)
            tl.store(crows + j * M + slot, tl.where(binned, b1, 255).to(tl.uint8), mask=inm)
            hist = tl.histogram(b1, NB1, mask=binned)
            tl.store(sc_ptr + OFF_H1 + ((row64 * C + c) * GROUP + j) * NB1 + tl.arange(0, NB1),
                     hist)
            top = binned & (b1 < E)
            tm = tl.zeros([E], tl.float32)
            if tl.sum(top.to(tl.int32), axis=0) > 0:
                w = libdevice.exp(x - mj) if EXACT_EXP else tl.exp(x - mj)
                for k in tl.static_range(E):
                    tm = tl.where(e == k, tl.sum(tl.where(top & (b1 == k), w, 0.0), axis=0), tm)
            tl.store(sc_ptr + OFF_T1 + ((row64 * C + c) * GROUP + j) * E + e,
                     tm.to(tl.int32, bitcast=True))
        tl.debug_barrier()  # every thread's writes happen before the ticket (release)
        if tl.atomic_add(tick, 1) == C - 1:  # the row's last program: bracket per head
            nb = tl.arange(0, NB1)
            for j in tl.static_range(GROUP):
                mj = tl.sum(tl.where(g == j, m, 0.0), axis=0)
                zj = tl.sum(tl.where(g == j, z, 0.0), axis=0)
                l0j = tl.max(tl.where(g == j, l0, float("-inf")), axis=0)
                s1j = tl.sum(tl.where(g == j, s1, 0.0), axis=0)
                allj = tl.sum(tl.where(g == j, allk.to(tl.int32), 0), axis=0)
                tot = tl.zeros([NB1], tl.int32)
                tmass = tl.zeros([E], tl.float32)
                c0 = 0
                while c0 < C:
                    ch = c0 + tl.arange(0, CB)
                    mc = (ch < C)[:, None]
                    hb = ((row64 * C + ch[:, None]) * GROUP + j)
                    tot += tl.sum(tl.load(sc_ptr + OFF_H1 + hb * NB1 + nb[None, :], mask=mc,
                                          other=0, cache_modifier=".cg"), axis=0)
                    tt = tl.load(sc_ptr + OFF_T1 + hb * E + e[None, :], mask=mc, other=0,
                                 cache_modifier=".cg")
                    tmass += tl.sum(tt.to(tl.float32, bitcast=True), axis=0)
                    c0 += CB
                fb = nb.to(tl.float32)
                up = tl.exp(-fb / s1j) * (1.0 + EDGE)
                lo = tl.exp(-(fb + 1.0) / s1j) * (1.0 - EDGE)
                exact = tl.sum(tl.where(nb[:, None] == e[None, :], tmass[None, :], 0.0), axis=1)
                cnt = tot.to(tl.float32)
                a_hi = tl.cumsum(tl.where(nb < E, exact * (1.0 + EDGE), cnt * up), axis=0)
                a_lo = tl.cumsum(tl.where(nb < E, exact * (1.0 - EDGE), cnt * lo), axis=0)
                target = p * zj
                bl = tl.minimum(tl.sum((a_lo < target * (1.0 + CROSS)).to(tl.int32), axis=0),
                                NB1 - 1)
                bf = tl.minimum(tl.sum((a_hi < target * (1.0 - CROSS)).to(tl.int32), axis=0), bl)
                pj = par + j * 16
                tl.store(pj + P_M, mj.to(tl.int32, bitcast=True))
                tl.store(pj + P_Z, zj.to(tl.int32, bitcast=True))
                tl.store(pj + P_L0, l0j.to(tl.int32, bitcast=True))
                tl.store(pj + P_S1, s1j.to(tl.int32, bitcast=True))
                tl.store(pj + P_BF, bf)
                tl.store(pj + P_BL, bl)
                s2 = NB2 / (bl + 1 - bf).to(tl.float32)
                tl.store(pj + P_S2, s2.to(tl.int32, bitcast=True))
                tl.store(pj + P_ALL, allj)

    if PHASE == 2:
        for j in tl.static_range(GROUP):
            pj = par + j * 16
            mj = tl.load(pj + P_M).to(tl.float32, bitcast=True)
            s1j = tl.load(pj + P_S1).to(tl.float32, bitcast=True)
            s2j = tl.load(pj + P_S2).to(tl.float32, bitcast=True)
            bfj = tl.load(pj + P_BF)
            blj = tl.load(pj + P_BL)
            code = tl.load(crows + j * M + slot, mask=inm, other=255).to(tl.int32)
            binned = code < 255
            above = binned & (code < bfj)
            inb = binned & (code >= bfj) & (code <= blj)
            x = tl.load(xrows + j * M + slot, mask=above | inb, other=0.0)
            d = ((mj - x) * s1j - bfj.to(tl.float32)) * s2j
            f = tl.minimum(tl.maximum(d, 0.0), NB2 - 1.0).to(tl.int32)
            f = tl.where(inb, f, 0)
            tl.store(crows + j * M + slot, (128 + f).to(tl.uint8), mask=inb)
            hist = tl.histogram(f, NB2, mask=inb)
            tl.store(sc_ptr + OFF_H2 + ((row64 * C + c) * GROUP + j) * NB2 + tl.arange(0, NB2),
                     hist)
            pa = tl.sum(tl.zeros([E], tl.float32), axis=0)
            tm = tl.zeros([E], tl.float32)
            top = inb & (f < E)
            if tl.sum((above | top).to(tl.int32), axis=0) > 0:
                w = libdevice.exp(x - mj) if EXACT_EXP else tl.exp(x - mj)
                pa = tl.sum(tl.where(above, w, 0.0), axis=0)
                for k in tl.static_range(E):
                    tm = tl.where(e == k, tl.sum(tl.where(top & (f == k), w, 0.0), axis=0), tm)
            tl.store(sc_ptr + OFF_P1 + (row64 * C + c) * GROUP + j, pa.to(tl.int32, bitcast=True))
            tl.store(sc_ptr + OFF_T2 + ((row64 * C + c) * GROUP + j) * E + e,
                     tm.to(tl.int32, bitcast=True))
        tl.debug_barrier()
        if tl.atomic_add(tick + 1, 1) == C - 1:  # the row's last program: fine brackets
            nf = tl.arange(0, NB2)
            base = tl.sum(tl.zeros([E], tl.int32), axis=0)
            for j in tl.static_range(GROUP):
                pj = par + j * 16
                zj = tl.load(pj + P_Z).to(tl.float32, bitcast=True)
                s1j = tl.load(pj + P_S1).to(tl.float32, bitcast=True)
                s2j = tl.load(pj + P_S2).to(tl.float32, bitcast=True)
                bff = tl.load(pj + P_BF).to(tl.float32)
                tot = tl.zeros([NB2], tl.int32)
                tmass = tl.zeros([E], tl.float32)
                abv = tl.zeros([CB], tl.float32)
                c0 = 0
                while c0 < C:
                    ch = c0 + tl.arange(0, CB)
                    mc = ch < C
                    hb = ((row64 * C + ch) * GROUP + j)
                    tot += tl.sum(tl.load(sc_ptr + OFF_H2 + hb[:, None] * NB2 + nf[None, :],
                                          mask=mc[:, None], other=0, cache_modifier=".cg"),
                                  axis=0)
                    tt = tl.load(sc_ptr + OFF_T2 + hb[:, None] * E + e[None, :],
                                 mask=mc[:, None], other=0, cache_modifier=".cg")
                    tmass += tl.sum(tt.to(tl.float32, bitcast=True), axis=0)
                    part = tl.load(sc_ptr + OFF_P1 + hb, mask=mc, other=0, cache_modifier=".cg")
                    abv += part.to(tl.float32, bitcast=True)
                    c0 += CB
                above1 = tl.sum(abv, axis=0)
                ff = nf.to(tl.float32)
                up = tl.exp(-(bff + ff / s2j) / s1j) * (1.0 + EDGE)
                lo = tl.exp(-(bff + (ff + 1.0) / s2j) / s1j) * (1.0 - EDGE)
                exact = tl.sum(tl.where(nf[:, None] == e[None, :], tmass[None, :], 0.0), axis=1)
                cnt = tot.to(tl.float32)
                a_hi = above1 + tl.cumsum(tl.where(nf < E, exact * (1.0 + EDGE), cnt * up), axis=0)
                a_lo = above1 + tl.cumsum(tl.where(nf < E, exact * (1.0 - EDGE), cnt * lo), axis=0)
                target = p * zj
                fl = tl.minimum(tl.sum((a_lo < target * (1.0 + CROSS)).to(tl.int32), axis=0),
                                NB2 - 1)
                fr = tl.minimum(tl.sum((a_hi < target * (1.0 - CROSS)).to(tl.int32), axis=0), fl)
                n_surv = tl.sum(tl.where((nf >= fr) & (nf <= fl), tot, 0), axis=0)
                # bisection bounds: below the fine bracket's lower edge, above its upper edge
                loe = tl.exp(-(bff + (fl + 1).to(tl.float32) / s2j) / s1j) * 0.999
                hie = tl.exp(-(bff + fr.to(tl.float32) / s2j) / s1j) * 1.001
                tl.store(pj + P_FF, fr)
                tl.store(pj + P_FL, fl)
                tl.store(pj + P_ABOVE, above1.to(tl.int32, bitcast=True))
                tl.store(pj + P_BASE, base)
                tl.store(pj + P_CNT, n_surv)
                tl.store(pj + P_LOE, loe.to(tl.int32, bitcast=True))
                tl.store(pj + P_HIE, hie.to(tl.int32, bitcast=True))
                base += n_surv

    if PHASE == 3:
        sure = slot < 0
        unsure = slot < 0
        nf = tl.arange(0, NB2)
        for j in tl.static_range(GROUP):
            pj = par + j * 16
            mj = tl.load(pj + P_M).to(tl.float32, bitcast=True)
            bfj = tl.load(pj + P_BF)
            frj = tl.load(pj + P_FF)
            flj = tl.load(pj + P_FL)
            code = tl.load(crows + j * M + slot, mask=inm, other=255).to(tl.int32)
            fine = (code >= 128) & (code < 255)
            f = code - 128
            above_f = fine & (f < frj)
            surv = fine & (f >= frj) & (f <= flj)
            sure = sure | (code < bfj) | above_f | (live & (tl.load(pj + P_ALL) != 0))
            unsure = unsure | surv
            x = tl.load(xrows + j * M + slot, mask=above_f | surv, other=0.0)
            w = libdevice.exp(x - mj) if EXACT_EXP else tl.exp(x - mj)
            tl.store(sc_ptr + OFF_P2 + (row64 * C + c) * GROUP + j,
                     tl.sum(tl.where(above_f, w, 0.0), axis=0).to(tl.int32, bitcast=True))
            # this chunk's survivors of head j follow those of the chunks before it
            before = tl.sum(tl.zeros([CB], tl.int32), axis=0)
            c0 = 0
            while c0 < c:
                cc = c0 + tl.arange(0, CB)
                hm = (cc < c)[:, None] & ((nf >= frj) & (nf <= flj))[None, :]
                hb = ((row64 * C + cc) * GROUP + j)
                before += tl.sum(tl.sum(tl.load(sc_ptr + OFF_H2 + hb[:, None] * NB2 + nf[None, :],
                                                mask=hm, other=0), axis=1), axis=0)
                c0 += CB
            dst = tl.load(pj + P_BASE) + before + tl.cumsum(surv.to(tl.int32), axis=0) - 1
            tl.store(sw_ptr + sbase + dst, w, mask=surv)
            tl.store(ss_ptr + sbase + dst, slot, mask=surv)
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
        if tl.atomic_add(tick + 2, 1) == C - 1:  # the row's last program: thresholds, union
            pv = par + g * 16
            z = tl.load(pv + P_Z, mask=mg, other=0).to(tl.float32, bitcast=True)
            cnt = tl.load(pv + P_CNT, mask=mg, other=0)
            base = tl.load(pv + P_BASE, mask=mg, other=0)
            above = tl.load(pv + P_ABOVE, mask=mg, other=0).to(tl.float32, bitcast=True)
            c0 = 0
            while c0 < C:
                cc = c0 + tl.arange(0, CB)
                part = tl.load(sc_ptr + OFF_P2 + (row64 * C + cc[:, None]) * GROUP + g[None, :],
                               mask=(cc < C)[:, None] & mg[None, :], other=0,
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
            if most <= SREG:  # all survivors in registers
                msk = mg[:, None] & (k[None, :] < cnt[:, None])
                ws = tl.load(sw_ptr + sbase + base[:, None] + k[None, :], mask=msk, other=0.0,
                             cache_modifier=".cg")
                while tl.max(hi - lo, axis=0) > 1:
                    mid = lo + (hi - lo) // 2
                    t = mid.to(tl.float32, bitcast=True)
                    ok = above + tl.sum(tl.where(ws >= t[:, None], ws, 0.0), axis=1) >= target
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid)
            else:  # streamed from the list once per step
                while tl.max(hi - lo, axis=0) > 1:
                    mid = lo + (hi - lo) // 2
                    t = mid.to(tl.float32, bitcast=True)
                    acc = tl.zeros([BLOCK_G], tl.float32)
                    k0 = 0
                    while k0 < most:
                        msk = mg[:, None] & ((k0 + k)[None, :] < cnt[:, None])
                        ws = tl.load(sw_ptr + sbase + base[:, None] + k0 + k[None, :], mask=msk,
                                     other=0.0, cache_modifier=".cg")
                        acc += tl.sum(tl.where(ws >= t[:, None], ws, 0.0), axis=1)
                        k0 += SREG
                    ok = above + acc >= target
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid)
            thr = lo.to(tl.float32, bitcast=True)
            tl.store(pv + P_T, lo, mask=mg)
            # the GQA union: head by head, a kept survivor claims its slot if still undecided
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
                    sv = tl.load(ss_ptr + sbase + bj + k0 + ku, mask=mk, other=0,
                                 cache_modifier=".cg")
                    kept = mk & (wv >= tj)
                    st = tl.load(state_row + sv, mask=kept, other=0, cache_modifier=".cg")
                    claim = kept & (st == 2)
                    tl.store(state_row + sv, tl.full([SU], 1, tl.uint8), mask=claim)
                    tl.atomic_add(cnt_row + sv // T, tl.full([SU], 1, tl.int32), mask=claim)
                    k0 += SU
                tl.debug_barrier()  # this head's claims are seen by the next head's loads
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


def workspace_numel(rows: int) -> int:
    """int32 counters the split kernel needs zeroed (a producer may zero them for it)."""
    return rows * TICKETS


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
    size), ``workspace`` ``workspace_numel(B * Hkv)`` zeroed int32 (allocated when None).
    Requires ``p < 1``.
    """
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
    per_row = [("h1", c * group * NB1), ("t1", c * group * EXACT_BINS),
               ("h2", c * group * NB2), ("t2", c * group * EXACT_BINS), ("p1", c * group),
               ("p2", c * group), ("par", group * NPAR), ("cnt", c), ("ofs", c)]
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
        workspace = torch.zeros(workspace_numel(rows), dtype=torch.int32, device=dev)
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
    for phase in (1, 2, 3, 4):
        _topp_split_kernel[(rows, c)](
            logits, smax, ssum, idx, cnt, forced if forced is not None else kept_counts,
            starts, ends, workspace, scratch, u8, surv_w, surv_s, kept, kept_counts,
            *istr, *fstr, hkv, m, cs, c, float(p), int(sink), int(window),
            offs["h1"], offs["t1"], offs["h2"], offs["t2"], offs["p1"], offs["p2"],
            offs["par"], offs["cnt"], offs["ofs"], rows * group * m,
            GROUP=group, BLOCK_G=block_g, T=t, CSB=min(STATS_BLOCK, next_pow2(cs)),
            CB=min(TAIL_CHUNKS, next_pow2(c)), CP=min(PREFIX_CHUNKS, next_pow2(c)), NB1=NB1,
            NB2=NB2, E=EXACT_BINS, SREG=sreg, SU=UNION_BLOCK, PHASE=phase, RANGE=range_mode,
            HAS_FORCED=forced is not None, HAS_SPAN=has_span, EXACT_EXP=not interpreting(),
            num_warps=warps,
        )
    return kept, kept_counts
