"""Triton kernels of the binned top-p rule (the rule and its torch reference:
:mod:`nucleus_attn.ops.topp`).

A KV head's row of candidates (its G query heads' logits, slot-major ``[M, G]``) is cut in
chunks of :data:`CHUNK` slots. The streaming passes run one program per (row, chunk), so a
single sequence keeps the whole GPU busy; what a pass needs from the passes before it (a
row's maximum, its crossing bins) is computed once per row by a tiny launch in between
(one program per row reducing a few hundred numbers), not by every program, and no pass
ends with a program that works while the others wait. Seven launches:

1. **scale** (:func:`_scale_kernel`, per row): the row maximum ``m`` and the lower bound
   ``Z'`` of the softmax sum from the chunk maxima, hence the level-1 bin width.
2. **level 1** (:func:`_level1_kernel`, per chunk): bins each logit (``NB1`` steps of
   log-weight), adds each binned weight to its bin's mass and every live weight to the
   row total (int64 fixed point, global atomics; consecutive chunks add into different
   copies of the histogram, ``STRIPES`` of them, so that a popular bin is not one
   address), and writes each logit's bin as one byte.
3. **crossing 1** (:func:`_cross1_kernel`, per row): sums the copies, finds each head's
   crossing bin ``k1``, the mass above it and the target ``floor(p * Z)``.
4. **level 2** (:func:`_level2_kernel`, per chunk): the members of the crossing bin (a
   few per cent of the candidates) load their logit again, add their weight to one of
   ``NB2`` sub-bins and write their sub-bin.
5. **crossing 2** (:func:`_cross2_kernel`, per row): each head's crossing sub-bin ``k2``.
6. **keep** (:func:`_keep_kernel`, per chunk): each head keeps the bins above ``k1`` and
   the sub-bins of ``k1`` up to ``k2``, decided from the bytes written above (no float is
   recomputed, so the decisions match the histograms exactly); the union over the group
   plus the forced slots (mask, sink, window) is written as one byte per slot, with the
   chunk's count.
7. **write** (:func:`_write_kernel`, per chunk): sums the counts of the chunks before it
   and writes its kept positions there, ascending.

Masses are int64 sums of ``floor(w * FIXED)``: integer addition does not depend on the
order of the atomics, so replays are deterministic. The histograms must start at zero:
the int4 kernel zeroes them inside its own launch (``workspace``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._dispatch import cdiv, const, helper, kernel, next_pow2, tl

if TYPE_CHECKING:
    from .topp import Estimates

CHUNK = 1024  # slots per program; also the chunks of the Z' bound
NB1 = 64  # level-1 bins
NB2 = 1024  # sub-bins of the crossing bin
STRIPES = 16  # copies of the level-1 histogram (chunk c adds into copy c % STRIPES)
FIXED = 2.0**40  # w in (0, 1] -> int64; a row of up to 2**22 weights sums below 2**63
BLOCK_T = 256  # slots per tile inside a program
ROW_BLOCK = 256  # chunk maxima, chunk counts or histogram copies reduced at once
NOT_BINNED = 255  # level-1 byte of a slot below the binned range, or not a candidate
KEEP_ALL = 254  # level-1 byte of a live slot in a row-head without a finite logit
WARPS = 4
# the constants as kernels read them (Triton wants globals wrapped as constexpr)
NB1_, NB2_ = const(NB1), const(NB2)
FIXED_, NOT_BINNED_, KEEP_ALL_ = const(FIXED), const(NOT_BINNED), const(KEEP_ALL)
# per (row, query head) parameters the per-row launches publish: float32 m, s1, finite;
# int64 k1, mass above k1, target, k2
F_M, F_S1, F_FIN, NF = 0, 1, 2, 4
I_K1, I_ABOVE, I_T, I_K2, NI = 0, 1, 2, 3, 4
F_M_, F_S1_, F_FIN_, NF_ = const(F_M), const(F_S1), const(F_FIN), const(NF)
I_K1_, I_ABOVE_, I_T_, I_K2_, NI_ = (const(v) for v in (I_K1, I_ABOVE, I_T, I_K2, NI))


def workspace_numel(rows: int, group: int) -> int:
    """int64 elements the passes accumulate into (zeroed first): per row and query head,
    the total, ``STRIPES`` copies of the level-1 masses and the level-2 masses."""
    return rows * group * (1 + STRIPES * NB1 + NB2)


def _offsets(rows: int, group: int) -> tuple[int, int]:
    """Offsets of the level-1 copies and of the level-2 masses in the workspace."""
    rg = rows * group
    return rg, rg * (1 + STRIPES * NB1)


# --- shared device code ----------------------------------------------------------------

@helper
def _row_bounds(b, row, starts_ptr, ends_ptr, counts_ptr, M, RANGE: tl.constexpr):
    """The row's candidate slots ``[lo, hi)`` (int32): the sequence's span in range mode
    (slot j is position j), ``[0, count)`` over an index list."""
    if RANGE:
        lo = tl.load(starts_ptr + b).to(tl.int32)
        hi = tl.minimum(tl.load(ends_ptr + b), M).to(tl.int32)
    else:
        lo = 0
        hi = tl.minimum(tl.load(counts_ptr + row), M).to(tl.int32)
    return lo, hi


@helper
def _first_reaching(cum, target, N: tl.constexpr):
    """Per head (row of ``cum``), the first bin whose cumulative mass reaches the target
    (the last bin if none does: rounding left the total a hair under it)."""
    return tl.minimum(tl.sum((cum < target[:, None]).to(tl.int32), axis=1), N - 1)


@helper
def _x_offsets(slot, g, stride_xs, stride_xg, G: tl.constexpr, SLOT_MAJOR: tl.constexpr):
    """Offsets of the logits ``[slot, head]`` in a row: slot-major contiguous logits (the
    int4 kernel's, stride known at compile time: vector loads) or any strides."""
    if SLOT_MAJOR:
        off = slot[:, None] * G + g[None, :]
    else:
        off = slot[:, None] * stride_xs + g[None, :] * stride_xg
    return off


# --- per-row launches ---------------------------------------------------------------------

@kernel(do_not_specialize=("M", "C"))
def _scale_kernel(
    cmax_ptr, counts_ptr, starts_ptr, ends_ptr, fpar_ptr, HKV, M, C, omp,
    G: tl.constexpr, BG: tl.constexpr, BC: tl.constexpr, RANGE: tl.constexpr,
):
    # one program per row: per query head the row maximum m (0 where no live logit is
    # finite), whether it is finite, and the level-1 bins per nat
    # s1 = NB1 / log(n / ((1 - p) Z')), Z' = sum over chunks of exp(chunk max - m)
    row = tl.program_id(0)
    g = tl.arange(0, BG)
    mg = g < G
    lo, hi = _row_bounds(row // HKV, row, starts_ptr, ends_ptr, counts_ptr, M, RANGE)
    n = hi - lo
    base = cmax_ptr + row.to(tl.int64) * C * G
    m = tl.full([BG], float("-inf"), tl.float32)
    for c0 in tl.range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cm = tl.load(base + cc[:, None] * G + g[None, :], mask=(cc < C)[:, None] & mg[None, :],
                     other=float("-inf"))
        m = tl.maximum(m, tl.max(cm, axis=0))
    finite = m > float("-inf")
    ms = tl.where(finite, m, 0.0)
    z = tl.zeros([BG], tl.float32)
    for c0 in tl.range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cm = tl.load(base + cc[:, None] * G + g[None, :], mask=(cc < C)[:, None] & mg[None, :],
                     other=float("-inf"))
        z += tl.sum(tl.where(cm > float("-inf"), tl.exp(cm - ms[None, :]), 0.0), axis=0)
    s1 = NB1_ / tl.log(tl.maximum(n, 1).to(tl.float32) / (omp * tl.maximum(z, 1.0)))
    out = fpar_ptr + (row.to(tl.int64) * G + g) * NF_
    tl.store(out + F_M_, ms, mask=mg)
    tl.store(out + F_S1_, s1, mask=mg)
    tl.store(out + F_FIN_, finite.to(tl.float32), mask=mg)


@kernel
def _cross1_kernel(
    ws_ptr, ipar_ptr, off1, RG,
    P: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, S: tl.constexpr,
):
    # one program per row: per query head the level-1 crossing bin k1 (the first whose
    # cumulative mass reaches the target), the mass of the bins above it and the target
    row = tl.program_id(0)
    g = tl.arange(0, BG)
    mg = g < G
    rg = row.to(tl.int64) * G + g
    target = (tl.load(ws_ptr + rg, mask=mg, other=0).to(tl.float64) * P).to(tl.int64)
    k = tl.arange(0, NB1_)
    mass = tl.zeros([BG, NB1_], tl.int64)
    for st in tl.static_range(S):  # the copies of the histogram
        mass += tl.load(ws_ptr + off1 + (st * RG + rg[:, None]) * NB1_ + k[None, :],
                        mask=mg[:, None], other=0)
    cum = tl.cumsum(mass, axis=1)
    k1 = _first_reaching(cum, target, NB1_)
    above = tl.sum(tl.where(k[None, :] < k1[:, None], mass, 0), axis=1)
    out = ipar_ptr + rg * NI_
    tl.store(out + I_K1_, k1.to(tl.int64), mask=mg)
    tl.store(out + I_ABOVE_, above, mask=mg)
    tl.store(out + I_T_, target, mask=mg)


@kernel
def _cross2_kernel(ws_ptr, ipar_ptr, off2, G: tl.constexpr, BG: tl.constexpr):
    # one program per row: per query head the crossing sub-bin k2 of the crossing bin
    row = tl.program_id(0)
    g = tl.arange(0, BG)
    mg = g < G
    rg = row.to(tl.int64) * G + g
    above = tl.load(ipar_ptr + rg * NI_ + I_ABOVE_, mask=mg, other=0)
    target = tl.load(ipar_ptr + rg * NI_ + I_T_, mask=mg, other=0)
    k = tl.arange(0, NB2_)
    mass = tl.load(ws_ptr + off2 + rg[:, None] * NB2_ + k[None, :], mask=mg[:, None], other=0)
    k2 = _first_reaching(above[:, None] + tl.cumsum(mass, axis=1), target, NB2_)
    tl.store(ipar_ptr + rg * NI_ + I_K2_, k2.to(tl.int64), mask=mg)


# --- streaming passes (one program per row and chunk) -----------------------------------

@kernel(do_not_specialize=("M", "C", "stride_xr"))
def _level1_kernel(
    x_ptr, counts_ptr, starts_ptr, ends_ptr, fpar_ptr, code_ptr, ws_ptr,
    stride_xr, stride_xs, stride_xg, HKV, M, C, off1, RG,
    G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, TILES: tl.constexpr,
    S: tl.constexpr, RANGE: tl.constexpr, SLOT_MAJOR: tl.constexpr,
):
    # bin the chunk's logits, add their fixed-point weights to the row's level-1 masses
    # (copy c % S) and total, write each logit's bin byte
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    g = tl.arange(0, BG)
    mg = g < G
    rg = row.to(tl.int64) * G + g
    par = fpar_ptr + rg * NF_
    ms = tl.load(par + F_M_, mask=mg, other=0.0)
    s1 = tl.load(par + F_S1_, mask=mg, other=0.0)
    finite = tl.load(par + F_FIN_, mask=mg, other=0.0) > 0
    xrow = x_ptr + row.to(tl.int64) * stride_xr
    cbase = code_ptr + row.to(tl.int64) * M * G + g[None, :]
    hist = ws_ptr + off1 + ((c % S) * RG + rg[None, :]) * NB1_
    lo, hi = _row_bounds(b, row, starts_ptr, ends_ptr, counts_ptr, M, RANGE)
    total = tl.zeros([BT, BG], tl.int64)
    for t in tl.static_range(TILES):
        slot = c * (BT * TILES) + t * BT + tl.arange(0, BT)
        lv = ((slot >= lo) & (slot < hi))[:, None] & mg[None, :]
        xo = _x_offsets(slot, g, stride_xs, stride_xg, G, SLOT_MAJOR)
        x = tl.load(xrow + xo, mask=lv, other=float("-inf")).to(tl.float32)
        u = (ms[None, :] - x) * s1[None, :]
        binned = lv & (u < NB1_) & finite[None, :]
        b1 = tl.minimum(u, NB1_ - 1.0).to(tl.int32)
        fix = (tl.exp(x - ms[None, :]) * FIXED_).to(tl.int64)  # 0 where not live (-inf)
        total += fix
        tl.atomic_add(hist + b1, fix, mask=binned, sem="relaxed")
        code = tl.where(binned, b1, tl.where(lv & ~finite[None, :], KEEP_ALL_, NOT_BINNED_))
        tl.store(cbase + slot[:, None] * G, code.to(tl.uint8),
                 mask=(slot < M)[:, None] & mg[None, :])
    tl.atomic_add(ws_ptr + rg, tl.sum(total, axis=0), mask=mg & finite, sem="relaxed")


@kernel(do_not_specialize=("M", "stride_xr"))
def _level2_kernel(
    x_ptr, fpar_ptr, ipar_ptr, code_ptr, sub_ptr, ws_ptr,
    stride_xr, stride_xs, stride_xg, M, off2,
    G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, TILES: tl.constexpr,
    SLOT_MAJOR: tl.constexpr,
):
    # the members of each head's crossing bin add their weights to its sub-bins and write
    # their sub-bin
    row = tl.program_id(0)
    c = tl.program_id(1)
    g = tl.arange(0, BG)
    mg = g < G
    rg = row.to(tl.int64) * G + g
    ms = tl.load(fpar_ptr + rg * NF_ + F_M_, mask=mg, other=0.0)
    s1 = tl.load(fpar_ptr + rg * NF_ + F_S1_, mask=mg, other=0.0)
    k1 = tl.load(ipar_ptr + rg * NI_ + I_K1_, mask=mg, other=NB1_).to(tl.int32)
    xrow = x_ptr + row.to(tl.int64) * stride_xr
    cbase = row.to(tl.int64) * M * G + g[None, :]
    for t in tl.static_range(TILES):
        slot = c * (BT * TILES) + t * BT + tl.arange(0, BT)
        inm = (slot < M)[:, None] & mg[None, :]
        code = tl.load(code_ptr + cbase + slot[:, None] * G, mask=inm, other=NOT_BINNED_)
        cross = inm & (code.to(tl.int32) == k1[None, :])
        xo = _x_offsets(slot, g, stride_xs, stride_xg, G, SLOT_MAJOR)
        x = tl.load(xrow + xo, mask=cross, other=0.0).to(tl.float32)
        u = (ms[None, :] - x) * s1[None, :]
        sub = ((u - k1[None, :].to(tl.float32)) * NB2_).to(tl.int32)
        sub = tl.minimum(tl.maximum(sub, 0), NB2_ - 1)
        fix = (tl.exp(x - ms[None, :]) * FIXED_).to(tl.int64)
        tl.atomic_add(ws_ptr + off2 + rg[None, :] * NB2_ + sub, fix, mask=cross, sem="relaxed")
        tl.store(sub_ptr + cbase + slot[:, None] * G, sub.to(tl.int16), mask=cross)


@kernel(do_not_specialize=("M", "C"))
def _keep_kernel(
    code_ptr, sub_ptr, ipar_ptr, idx_ptr, counts_ptr, forced_ptr, starts_ptr, ends_ptr,
    keep_ptr, chunk_ptr, stride_ib, stride_ih, stride_fb, stride_fh, HKV, M, C, sink, window,
    G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, TILES: tl.constexpr,
    RANGE: tl.constexpr, HAS_FORCED: tl.constexpr, HAS_SPAN: tl.constexpr,
):
    # each head keeps the bins above its crossing bin and the sub-bins up to its crossing
    # sub-bin; the union over the group plus the forced slots, one byte per slot, and the
    # chunk's count
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    g = tl.arange(0, BG)
    mg = g < G
    rg = row.to(tl.int64) * G + g
    k1 = tl.load(ipar_ptr + rg * NI_ + I_K1_, mask=mg, other=-1).to(tl.int32)
    k2 = tl.load(ipar_ptr + rg * NI_ + I_K2_, mask=mg, other=-1).to(tl.int32)
    cbase = row.to(tl.int64) * M * G + g[None, :]
    ibase = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    if HAS_SPAN:
        start = tl.load(starts_ptr + b).to(tl.int32)
        end = tl.load(ends_ptr + b).to(tl.int32)
    lo, hi = _row_bounds(b, row, starts_ptr, ends_ptr, counts_ptr, M, RANGE)
    count = 0
    for t in tl.static_range(TILES):
        slot = c * (BT * TILES) + t * BT + tl.arange(0, BT)
        inm = slot < M
        live = (slot >= lo) & (slot < hi)
        code = tl.load(code_ptr + cbase + slot[:, None] * G, mask=inm[:, None] & mg[None, :],
                       other=NOT_BINNED_).to(tl.int32)
        cross = code == k1[None, :]
        sub = tl.load(sub_ptr + cbase + slot[:, None] * G, mask=cross & mg[None, :], other=0)
        kh = ((code < k1[None, :]) | (code == KEEP_ALL_)
              | (cross & (sub.to(tl.int32) <= k2[None, :])))
        kt = tl.max(kh.to(tl.int32), axis=1) > 0
        if HAS_FORCED:
            fo = tl.load(forced_ptr + b.to(tl.int64) * stride_fb + h.to(tl.int64) * stride_fh
                         + slot, mask=inm, other=0)
            kt = kt | (fo != 0)
        if HAS_SPAN:
            if RANGE:  # noqa: SIM108 (a constexpr branch: the other side is never compiled)
                pos = slot
            else:
                pos = tl.load(ibase + slot, mask=inm, other=0).to(tl.int32)
            near = (pos < start + sink) | (pos >= end - window)
            kt = kt | ((pos >= start) & (pos < end) & near)
        kt = kt & live
        tl.store(keep_ptr + row.to(tl.int64) * M + slot, kt.to(tl.uint8), mask=inm)
        count += tl.sum(kt.to(tl.int32), axis=0)
    tl.store(chunk_ptr + row.to(tl.int64) * C + c, count)


@kernel(do_not_specialize=("M", "C"))
def _write_kernel(
    keep_ptr, idx_ptr, chunk_ptr, kept_ptr, kept_counts_ptr, stride_ib, stride_ih, HKV, M, C,
    BT: tl.constexpr, TILES: tl.constexpr, BCP: tl.constexpr, RANGE: tl.constexpr,
):
    # the chunk's kept positions at the offset the counts of the chunks before it give,
    # ascending
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    before = 0
    total = 0
    for c0 in tl.range(0, C, BCP):
        cc = c0 + tl.arange(0, BCP)
        cnt = tl.load(chunk_ptr + row.to(tl.int64) * C + cc, mask=cc < C, other=0)
        before += tl.sum(tl.where(cc < c, cnt, 0), axis=0)
        total += tl.sum(cnt, axis=0)
    if c == 0:
        tl.store(kept_counts_ptr + row, total.to(tl.int64))
    ibase = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    out = kept_ptr + row.to(tl.int64) * M
    for t in tl.static_range(TILES):
        slot = c * (BT * TILES) + t * BT + tl.arange(0, BT)
        kt = tl.load(keep_ptr + row.to(tl.int64) * M + slot, mask=slot < M, other=0) != 0
        if RANGE:  # noqa: SIM108 (a constexpr branch: the other side is never compiled)
            pos = slot.to(tl.int64)
        else:
            pos = tl.load(ibase + slot, mask=kt, other=0).to(tl.int64)
        dst = before + tl.cumsum(kt.to(tl.int32), axis=0) - 1
        tl.store(out + dst, pos, mask=kt)
        before += tl.sum(kt.to(tl.int32), axis=0)


def select(est: Estimates, p: float, *, sink: int = 0, window: int = 0,
           forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Kept positions ``[B, Hkv, M]`` int64 (ascending in slot order, first ``counts``
    live, unspecified after them) and ``counts [B, Hkv]`` of the binned rule over the
    candidates of ``est``; ``p < 1``."""
    x = est.values
    b, hkv, m, g = x.shape
    rows = b * hkv
    dev = x.device
    c = cdiv(m, CHUNK)
    ws = est.take_workspace(workspace_numel(rows, g))
    if ws is None:
        ws = torch.zeros(workspace_numel(rows, g), dtype=torch.int64, device=dev)
    off1, off2 = _offsets(rows, g)
    fpar = torch.empty(rows * g * NF, dtype=torch.float32, device=dev)
    ipar = torch.empty(rows * g * NI, dtype=torch.int64, device=dev)
    codes = torch.empty(rows, m, g, dtype=torch.uint8, device=dev)
    subs = torch.empty(rows, m, g, dtype=torch.int16, device=dev)
    keep = torch.empty(rows, m, dtype=torch.uint8, device=dev)
    chunk_counts = torch.empty(rows, c, dtype=torch.int32, device=dev)
    kept = torch.empty(b, hkv, m, dtype=torch.int64, device=dev)
    kept_counts = torch.empty(b, hkv, dtype=torch.int64, device=dev)
    range_mode = est.indices is None
    if range_mode:
        idx, cnt, istr = kept_counts, kept_counts, (0, 0)
    else:
        idx = est.indices if est.indices.stride(-1) == 1 else est.indices.contiguous()
        cnt = est.counts.contiguous()
        istr = (idx.stride(0), idx.stride(1))
    if forced is not None and forced.stride(-1) != 1:
        forced = forced.contiguous()
    fstr = (forced.stride(0), forced.stride(1)) if forced is not None else (0, 0)
    span = est.span
    if b > 1 and x.stride(0) != hkv * x.stride(1):  # rows must be evenly strided
        x = x.contiguous()
    xs = (x.stride(1), x.stride(2), x.stride(3))
    block_t = min(BLOCK_T, next_pow2(max(m, 16)))
    tiles = cdiv(CHUNK, block_t) if m > block_t else 1
    bg = next_pow2(g)
    tile = dict(BT=block_t, TILES=tiles, num_warps=WARPS)
    grid = (rows, c)
    slot_major = x.stride(3) == 1 and x.stride(2) == g
    _scale_kernel[(rows,)](
        est.chunk_max.contiguous(), cnt, span.starts, span.ends, fpar, hkv, m, c, 1.0 - p,
        G=g, BG=bg, BC=min(ROW_BLOCK, next_pow2(c)), RANGE=range_mode, num_warps=WARPS,
    )
    _level1_kernel[grid](
        x, cnt, span.starts, span.ends, fpar, codes, ws, *xs, hkv, m, c, off1, rows * g,
        G=g, BG=bg, S=STRIPES, RANGE=range_mode, SLOT_MAJOR=slot_major, **tile,
    )
    _cross1_kernel[(rows,)](ws, ipar, off1, rows * g, P=float(p), G=g, BG=bg, S=STRIPES,
                            num_warps=WARPS)
    _level2_kernel[grid](x, fpar, ipar, codes, subs, ws, *xs, m, off2, G=g, BG=bg,
                         SLOT_MAJOR=slot_major, **tile)
    _cross2_kernel[(rows,)](ws, ipar, off2, G=g, BG=bg, num_warps=8)
    _keep_kernel[grid](
        codes, subs, ipar, idx, cnt, forced if forced is not None else codes, span.starts,
        span.ends, keep, chunk_counts, *istr, *fstr, hkv, m, c, int(sink), int(window),
        G=g, BG=bg, RANGE=range_mode, HAS_FORCED=forced is not None,
        HAS_SPAN=bool(sink or window), **tile,
    )
    _write_kernel[grid](
        keep, idx, chunk_counts, kept, kept_counts, *istr, hkv, m, c,
        BCP=min(ROW_BLOCK, next_pow2(c)), RANGE=range_mode, **tile,
    )
    return kept, kept_counts
