"""4-bit keys: per-token asymmetric quantization, and estimated scores q.K^ over candidates.

Twilight's pruner needs attention weights of its candidates, but reading their full
keys would cost as much as attending to them. A 4-bit copy of the keys (two codes per
byte plus a scale and a zero per token: +1/8 of the KV memory at d=128) gives estimated
logits at a quarter of the key bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..span import KeySpan
from . import topp_split
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
from .topp import ScoreStats, score_stats

LEVELS = 15  # 4 bits: codes 0..15
INV_LEVELS = 1.0 / LEVELS  # a multiplication, not a division: torch divides a CUDA tensor
# by a Python scalar through its reciprocal, so "/ 15" would round differently per device


# --- quantization ------------------------------------------------------------------------

def quantize_int4_reference(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token asymmetric 4-bit quantization of keys.

    Parameters
    ----------
    k : Tensor
        ``[B, Hkv, N, d]``, d even.

    Returns
    -------
    codes : Tensor
        ``[B, Hkv, N, d // 2]`` uint8; channel 2j in the low nibble, 2j+1 in the high one.
    scale, zero : Tensor
        ``[B, Hkv, N]`` in k's dtype; ``k ~= zero + scale * code``.
    """
    # reads: the keys once (2d bytes a token in 16-bit); writes d/2 + 2 * 2 bytes a token
    kf = k.float()
    lo, hi = kf.amin(-1), kf.amax(-1)
    # Round the parameters to storage precision first so that dequantization with the
    # stored values is exactly what the codes were chosen for.
    scale = ((hi - lo) * INV_LEVELS).to(k.dtype)
    zero = lo.to(k.dtype)
    step = torch.where(scale.float() > 0, scale.float(), torch.ones_like(lo))
    code = torch.round((kf - zero.float()[..., None]) / step[..., None]).clamp_(0, LEVELS)
    code = code.to(torch.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, scale, zero


@kernel
def _quantize_int4_kernel(
    k_ptr, codes_ptr, scale_ptr, zero_ptr, stride_kb, stride_kh, stride_kn, H, N, D2,
    INV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D2: tl.constexpr, BF16: tl.constexpr,
):
    # one program per (sequence, KV head, BLOCK_T tokens); even and odd channels are
    # loaded separately so that the two codes of a byte sit in the same lane
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_D2)
    mt = t < N
    m = mt[:, None] & (j < D2)[None, :]
    base = (k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            + t[:, None].to(tl.int64) * stride_kn + 2 * j[None, :])
    ev = tl.load(base, mask=m, other=0.0).to(tl.float32)
    od = tl.load(base + 1, mask=m, other=0.0).to(tl.float32)
    lo = tl.minimum(tl.min(tl.where(m, ev, float("inf")), axis=1),
                    tl.min(tl.where(m, od, float("inf")), axis=1))
    hi = tl.maximum(tl.max(tl.where(m, ev, float("-inf")), axis=1),
                    tl.max(tl.where(m, od, float("-inf")), axis=1))
    lo = tl.where(mt, lo, 0.0)  # rows past N: keep the arithmetic finite
    hi = tl.where(mt, hi, 0.0)
    scale = (hi - lo) * INV
    # round scale and zero to the storage dtype (round to nearest even), as the reference
    if BF16:  # by hand: the 3.6 interpreter's float32 -> bfloat16 cast does not round to even
        sb = scale.to(tl.int32, bitcast=True)
        scale = ((sb + 0x7FFF + ((sb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        zb = lo.to(tl.int32, bitcast=True)
        zero = ((zb + 0x7FFF + ((zb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    else:
        scale = scale.to(scale_ptr.dtype.element_ty).to(tl.float32)
        zero = lo.to(zero_ptr.dtype.element_ty).to(tl.float32)
    step = tl.where(scale > 0, scale, 1.0)[:, None]
    # round half to even, as torch.round: floor plus a correction from the exact fraction
    x_ev = tl.math.div_rn(ev - zero[:, None], step)
    x_od = tl.math.div_rn(od - zero[:, None], step)
    f_ev = tl.floor(x_ev)
    f_od = tl.floor(x_od)
    r_ev = f_ev.to(tl.int32)
    r_od = f_od.to(tl.int32)
    d_ev = x_ev - f_ev
    d_od = x_od - f_od
    r_ev += ((d_ev > 0.5) | ((d_ev == 0.5) & ((r_ev & 1) == 1))).to(tl.int32)
    r_od += ((d_od > 0.5) | ((d_od == 0.5) & ((r_od & 1) == 1))).to(tl.int32)
    r_ev = tl.minimum(tl.maximum(r_ev, 0), 15)
    r_od = tl.minimum(tl.maximum(r_od, 0), 15)
    packed = (r_ev | (r_od << 4)).to(tl.uint8)
    row = bh.to(tl.int64) * N + t
    tl.store(codes_ptr + row[:, None] * D2 + j[None, :], packed, mask=m)
    tl.store(scale_ptr + row, scale.to(scale_ptr.dtype.element_ty), mask=mt)
    tl.store(zero_ptr + row, zero.to(zero_ptr.dtype.element_ty), mask=mt)


def quantize_int4_triton(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of :func:`quantize_int4_reference` (same contract and bits)."""
    k = last_dim_dense(k)
    b, h, n, d = k.shape
    codes = torch.empty(b, h, n, d // 2, dtype=torch.uint8, device=k.device)
    scale = torch.empty(b, h, n, dtype=k.dtype, device=k.device)
    zero = torch.empty_like(scale)
    if n == 0 or b * h == 0:
        return codes, scale, zero
    block_d2 = next_pow2(d // 2)
    block_t = max(1, min(64, 4096 // block_d2, next_pow2(n)))
    _quantize_int4_kernel[(b * h, cdiv(n, block_t))](
        k, codes, scale, zero, *row_strides(k), h, n, d // 2,
        INV=INV_LEVELS, BLOCK_T=block_t, BLOCK_D2=block_d2, BF16=k.dtype == torch.bfloat16,
        num_warps=4,
    )
    return codes, scale, zero


def quantize_int4(k: Tensor, *, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """4-bit keys; see :func:`quantize_int4_reference` for the contract."""
    if k.dim() != 4 or k.shape[-1] % 2:
        raise ValueError(f"int4 keys need an even head dim and k of shape [B, Hkv, N, d], got "
                         f"{tuple(k.shape)}")
    if use_triton(impl, k):
        return quantize_int4_triton(k)
    return quantize_int4_reference(k)


def dequantize_int4(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``[..., d]`` float32 keys back from their codes (for tests and diagnostics)."""
    lo = (codes & 0xF).float()
    hi = (codes >> 4).float()
    code = torch.stack((lo, hi), dim=-1).flatten(-2)
    return zero.float()[..., None] + scale.float()[..., None] * code


# --- estimated scores over a candidate set -----------------------------------------------

INT4_BLOCK_M = 128  # candidates per tile (tuned on an H100 at the Llama-3-8B shape)
INT4_WARPS = 4
INT4_RANGE_TILES = 4  # tiles per program in range mode: its ScoreStats chunk is 4 tiles

def int4_scores_reference(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    indices: Tensor,
    counts: Tensor,
    sm_scale: float,
) -> Tensor:
    """Estimated logits ``sm_scale * q . K^`` over each KV head's candidate positions.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    codes, scale, zero : Tensor
        From :func:`quantize_int4` over the whole cache (``[B, Hkv, N, d // 2]``, ``[B, Hkv, N]``).
    indices : Tensor
        ``[B, Hkv, M]`` int64 candidate positions; the first ``counts`` are live.
    counts : Tensor
        ``[B, Hkv]`` int64.
    sm_scale : float
        Softmax scale (1/sqrt(d) usually).

    Returns
    -------
    Tensor
        ``[B, Hq, M]`` float32; ``-inf`` past ``counts``.
    """
    b, hq, d = q.shape
    hkv, m = indices.shape[1], indices.shape[2]
    # reads per KV head: M * (d/2 + 2 * sizeof(scale)) bytes, once for the whole group
    idx = indices[..., None].expand(b, hkv, m, d // 2)
    kq = dequantize_int4(
        codes.gather(2, idx), scale.gather(2, indices), zero.gather(2, indices)
    )
    qg = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bhmd->bhgm", qg, kq) * sm_scale
    live = (torch.arange(m, device=q.device) < counts[..., None])[:, :, None]
    return torch.where(live, s, torch.full_like(s, float("-inf"))).view(b, hq, m)


@kernel(do_not_specialize=("CS", "WS_N"))
def _int4_scores_kernel(
    q_ptr, codes_ptr, scale_ptr, zero_ptr, idx_ptr, counts_ptr, starts_ptr, ends_ptr, out_ptr,
    smax_ptr, ssum_ptr, ws_ptr,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_cn, stride_sb, stride_sh,
    stride_ib, stride_ih, HKV, M, D2, CS, WS_N, sm_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D2: tl.constexpr, TILES: tl.constexpr, DOT_F32: tl.constexpr, RANGE: tl.constexpr,
    STATS: tl.constexpr, ZB: tl.constexpr,
):
    # one program per (sequence, KV head, TILES * BLOCK_M candidates): each candidate's codes
    # are read once and scored for the whole query group with two small matrix products,
    #   q . k^ = zero * sum(q) + scale * (q_even . code_lo + q_odd . code_hi)
    # RANGE: candidate j is position j, live inside the sequence's span (no index list).
    # STATS: also the program's max and sum of exp per query head (one ScoreStats chunk),
    # and a share of the top-p kernel's workspace zeroed
    bh = tl.program_id(0)
    ct = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    if RANGE:
        start = tl.load(starts_ptr + b)
        end = tl.load(ends_ptr + b)
    else:
        cnt = tl.load(counts_ptr + bh)
    j = tl.arange(0, BLOCK_D2)
    mj = j < D2
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    qrow = q_ptr + b.to(tl.int64) * stride_qb + (h * GROUP + g)[:, None] * stride_qh
    mq = mg[:, None] & mj[None, :]
    q_ev = tl.load(qrow + 2 * j[None, :], mask=mq, other=0.0)
    q_od = tl.load(qrow + 2 * j[None, :] + 1, mask=mq, other=0.0)
    if DOT_F32:
        q_ev = q_ev.to(tl.float32)
        q_od = q_od.to(tl.float32)
    qsum = tl.sum(q_ev.to(tl.float32) + q_od.to(tl.float32), axis=1)
    cbase = codes_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    hq = HKV * GROUP
    smx = tl.full([BLOCK_G], float("-inf"), tl.float32)
    sse = tl.zeros([BLOCK_G], tl.float32)
    for t in tl.static_range(TILES):
        slot = (ct * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        if RANGE:
            live = (slot >= start) & (slot < end) & (slot < M)
            idx = slot.to(tl.int64)
        else:
            live = slot < cnt
            idx = tl.load(idx_ptr + b.to(tl.int64) * stride_ib + h * stride_ih + slot, mask=live,
                          other=0).to(tl.int64)
        codes = tl.load(cbase + idx[:, None] * stride_cn + j[None, :],
                        mask=live[:, None] & mj[None, :], other=0)
        c_lo = codes & 15
        c_hi = codes >> 4
        if DOT_F32:
            acc = tl.dot(q_ev, tl.trans(c_lo.to(tl.float32)), input_precision="ieee")
            acc = tl.dot(q_od, tl.trans(c_hi.to(tl.float32)), acc, input_precision="ieee")
        else:  # codes 0..15 are exact in 16-bit floats; products accumulate in float32
            acc = tl.dot(q_ev, tl.trans(c_lo.to(q_ev.dtype)))
            acc = tl.dot(q_od, tl.trans(c_hi.to(q_od.dtype)), acc)
        sbase = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + idx
        sc = tl.load(scale_ptr + sbase, mask=live, other=0.0).to(tl.float32)
        ze = tl.load(zero_ptr + sbase, mask=live, other=0.0).to(tl.float32)
        s = (ze[None, :] * qsum[:, None] + sc[None, :] * acc) * sm_scale
        s = tl.where(live[None, :], s, float("-inf"))
        out = out_ptr + (b.to(tl.int64) * hq + h * GROUP + g[:, None]) * M + slot[None, :]
        tl.store(out, s, mask=mg[:, None] & (slot < M)[None, :])
        if STATS:
            new = tl.maximum(smx, tl.max(s, axis=1))
            ref = tl.where(new > float("-inf"), new, 0.0)
            sse = sse * tl.exp(smx - ref) + tl.sum(tl.exp(s - ref[:, None]), axis=1)
            smx = new
    if STATS:
        srow = (b.to(tl.int64) * hq + h * GROUP + g) * CS + ct
        tl.store(smax_ptr + srow, smx, mask=mg)
        tl.store(ssum_ptr + srow, sse, mask=mg)
        step = tl.num_programs(0) * tl.num_programs(1) * ZB
        i = (ct * tl.num_programs(0) + bh) * ZB
        while i < WS_N:
            zz = i + tl.arange(0, ZB)
            tl.store(ws_ptr + zz, tl.zeros([ZB], tl.int32), mask=zz < WS_N)
            i += step


def _int4_launch(q: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, indices: Tensor | None,
                 counts: Tensor | None, span: KeySpan | None, m: int, sm_scale: float,
                 stats: bool) -> Tensor | tuple[Tensor, ScoreStats]:
    """The int4 scores kernel over an index list (``indices``/``counts``) or, with
    ``indices=None``, over the positions ``[0, m)`` live inside ``span``."""
    q, codes = last_dim_dense(q), last_dim_dense(codes)
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    b, hq, d = q.shape
    hkv = codes.shape[1]
    dev = q.device
    out = torch.empty(b, hq, m, dtype=torch.float32, device=dev)
    if m == 0:
        return (out, score_stats(out)) if stats else out
    g = hq // hkv
    block_d2 = max(16, next_pow2(d // 2))
    block_m = max(16, min(INT4_BLOCK_M, 8192 // block_d2, next_pow2(m)))
    rng = indices is None
    tiles = max(1, min(INT4_RANGE_TILES, cdiv(m, block_m))) if rng else 1
    cs = cdiv(m, block_m * tiles)
    if rng:
        idx, cnt, istr = span.starts, span.starts, (0, 0)
        starts, ends = span.starts, span.ends
    else:
        idx, cnt = last_dim_dense(indices), counts.contiguous()
        istr = (idx.stride(0), idx.stride(1))
        starts = ends = cnt
    if stats:
        smax = torch.empty(b, hq, cs, dtype=torch.float32, device=dev)
        ssum = torch.empty_like(smax)
        ws = torch.empty(topp_split.workspace_numel(b * hkv, g), dtype=torch.int32,
                         device=dev)
    else:
        smax = ssum = out
        ws = cnt
    _int4_scores_kernel[(b * hkv, cs)](
        q, codes, scale, zero, idx, cnt, starts, ends, out, smax, ssum, ws,
        q.stride(0), q.stride(1), *row_strides(codes), scale.stride(0), scale.stride(1),
        *istr, hkv, m, d // 2, cs, ws.numel() if stats else 0, float(sm_scale),
        GROUP=g, BLOCK_G=dot_block(g), BLOCK_M=block_m, BLOCK_D2=block_d2, TILES=tiles,
        DOT_F32=dot_in_f32(q), RANGE=rng, STATS=stats, ZB=256, num_warps=INT4_WARPS,
    )
    if not stats:
        return out
    return out, ScoreStats(block_m * tiles, smax, ssum, workspace=ws)


def int4_scores_triton(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    indices: Tensor,
    counts: Tensor,
    sm_scale: float,
) -> Tensor:
    """Triton version of :func:`int4_scores_reference` (same contract)."""
    return _int4_launch(q, codes, scale, zero, indices, counts, None, indices.shape[2],
                        sm_scale, False)


def int4_scores(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    indices: Tensor,
    counts: Tensor,
    sm_scale: float,
    *,
    stats: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, ScoreStats]:
    """Estimated candidate logits; see :func:`int4_scores_reference` for the contract.

    With ``stats=True`` also returns the logits' per-chunk softmax statistics
    (:class:`nucleus_attn.ops.topp.ScoreStats`), for :func:`nucleus_attn.ops.topp_select`.
    """
    if codes.shape[-1] * 2 != q.shape[-1]:
        raise ValueError(f"codes hold d/2={codes.shape[-1]} bytes a key but q has "
                         f"d={q.shape[-1]}; quantize the keys of this cache")
    if use_triton(impl, q, codes, indices):
        return _int4_launch(q, codes, scale, zero, indices, counts, None, indices.shape[2],
                            sm_scale, stats)
    out = int4_scores_reference(q, codes, scale, zero, indices, counts, sm_scale)
    return (out, score_stats(out)) if stats else out


# --- estimated scores over every valid position ------------------------------------------

def int4_scores_range_reference(
    q: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, span: KeySpan, sm_scale: float
) -> Tensor:
    """Estimated logits ``sm_scale * q . K^`` at every position of the cache.

    The range form of :func:`int4_scores_reference`: no candidate index list, the
    candidates are the valid positions of ``span``. Returns ``[B, Hq, N]`` float32 over
    cache positions (slot j is position j), ``-inf`` outside the span.
    """
    b, hq, d = q.shape
    hkv, n = codes.shape[1], codes.shape[2]
    # reads per KV head: N * (d/2 + 2 * sizeof(scale)) bytes, once for the whole group
    kq = dequantize_int4(codes, scale, zero)
    s = torch.einsum("bhgd,bhnd->bhgn", q.float().view(b, hkv, hq // hkv, d), kq) * sm_scale
    valid = span.valid_mask()[:, None, None, :]
    return torch.where(valid, s, torch.full_like(s, float("-inf"))).reshape(b, hq, n)


def int4_scores_range(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    span: KeySpan,
    sm_scale: float,
    *,
    stats: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, ScoreStats]:
    """Estimated logits of every valid position; see :func:`int4_scores_range_reference`.

    With ``stats=True`` also returns their per-chunk softmax statistics, for
    :func:`nucleus_attn.ops.topp_select_range`.
    """
    if codes.shape[-1] * 2 != q.shape[-1]:
        raise ValueError(f"codes hold d/2={codes.shape[-1]} bytes a key but q has "
                         f"d={q.shape[-1]}; quantize the keys of this cache")
    if span.n > codes.shape[2] or span.starts.shape[0] != q.shape[0]:
        raise ValueError(f"the span ({span.starts.shape[0]} sequences of N={span.n}) does not "
                         f"fit the int4 keys {tuple(codes.shape)} and q {tuple(q.shape)}")
    n = span.n
    codes, scale, zero = codes[:, :, :n], scale[:, :, :n], zero[:, :, :n]
    if use_triton(impl, q, codes):
        return _int4_launch(q, codes, scale, zero, None, None, span, n, sm_scale, stats)
    out = int4_scores_range_reference(q, codes, scale, zero, span, sm_scale)
    return (out, score_stats(out)) if stats else out
