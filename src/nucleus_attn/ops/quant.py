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
from . import topp_binned
from ._dispatch import (
    cdiv,
    const,
    helper,
    interpreting,
    kernel,
    last_dim_dense,
    next_pow2,
    row_strides,
    tl,
    use_triton,
)
from .topp import Estimates, slot_major

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


# --- estimated scores ----------------------------------------------------------------------
#
# The estimate of a logit is q.k^ with k^ = zero + scale * code, computed as
#   est = zero * sum(q) + scale * sq * (q~ . code)
# where q~ = round(q / sq) holds the query in int8 (sq = max|q| / 127 per query head), so
# that q~ . code is an exact integer dot product on int8 tensor cores. Quantizing the query
# adds an error about 20 times smaller than the 4-bit keys' own. The estimate is then
# rounded to float16: the top-p passes read 2 bytes per logit instead of 4.

INT4_BLOCK_M = 64  # candidates per tile of the estimates kernel (H200: 64 beat 128 and 256)
INT4_WARPS = 4
INT4_STAGES = 3  # software-pipelining depth of its tile loop
F16_MAX = 65504.0


INV_Q = 1.0 / 127.0  # the step of the int8 query is max|q| times this (a multiplication: the
# same bits on every device, where a division by a Python scalar is not)


def quantize_query(q: Tensor) -> tuple[Tensor, Tensor]:
    """The int8 query of the estimate: ``q~ [B, Hq, d]`` (float32 holding integers in
    [-127, 127]) and ``sq [B, Hq]`` with ``q ~= sq * q~``."""
    qf = q.float()
    amax = qf.abs().amax(-1)
    sq = torch.where(amax > 0, amax * INV_Q, torch.ones_like(amax))
    return torch.round(qf / sq[..., None]).clamp_(-127, 127), sq


def _estimate(q: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, sm_scale: float) -> Tensor:
    """``[B, Hkv, G, N']`` float32 estimates (float16 values) of q against int4 rows
    ``codes [B, Hkv, N', d/2]`` with their ``scale``/``zero [B, Hkv, N']``."""
    b, hq, d = q.shape
    hkv = codes.shape[1]
    qi, sq = quantize_query(q)
    qsum = q.float().sum(-1)
    code = torch.stack(((codes & 0xF).float(), (codes >> 4).float()), dim=-1).flatten(-2)
    dot = torch.einsum("bhgd,bhnd->bhgn", qi.view(b, hkv, hq // hkv, d), code)  # exact
    qs = (qsum * sm_scale).view(b, hkv, -1, 1)
    sqs = (sq * sm_scale).view(b, hkv, -1, 1)
    est = zero.float()[:, :, None, :] * qs + scale.float()[:, :, None, :] * (dot * sqs)
    return est.clamp(-F16_MAX, F16_MAX).half().float()


def int4_scores_reference(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    indices: Tensor,
    counts: Tensor,
    sm_scale: float,
) -> Tensor:
    """Estimated logits of each KV head's candidate positions (see the section comment).

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
        ``[B, Hq, M]`` float32 holding float16 values; ``-inf`` past ``counts``.
    """
    b, hq, _ = q.shape
    hkv, m = indices.shape[1], indices.shape[2]
    # reads per KV head: M * (d/2 + 2 * sizeof(scale)) bytes, once for the whole group
    idx = indices[..., None].expand(b, hkv, m, codes.shape[-1])
    s = _estimate(q, codes.gather(2, idx), scale.gather(2, indices), zero.gather(2, indices),
                  sm_scale)
    live = (torch.arange(m, device=q.device) < counts[..., None])[:, :, None]
    return torch.where(live, s, torch.full_like(s, float("-inf"))).view(b, hq, m)


def int4_scores_range_reference(
    q: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, span: KeySpan, sm_scale: float
) -> Tensor:
    """Estimated logits at every position of the cache.

    The range form of :func:`int4_scores_reference`: no candidate index list, the
    candidates are the valid positions of ``span``. Returns ``[B, Hq, N]`` float32 over
    cache positions (slot j is position j), ``-inf`` outside the span.
    """
    b, hq, _ = q.shape
    n = codes.shape[2]
    # reads per KV head: N * (d/2 + 2 * sizeof(scale)) bytes, once for the whole group
    s = _estimate(q, codes, scale, zero, sm_scale)
    valid = span.valid_mask()[:, None, None, :]
    return torch.where(valid, s, torch.full_like(s, float("-inf"))).reshape(b, hq, n)


@helper
def _round_even(x, LIBDEVICE: tl.constexpr):
    """Round half to even, as torch.round (libdevice's rint; the interpreter has none)."""
    if LIBDEVICE:
        r = libdevice.rint(x)
    else:
        f = tl.floor(x)
        d = x - f
        odd = (f - 2.0 * tl.floor(0.5 * f)) == 1.0
        r = f + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.float32)
    return r


@helper
def _unpack_nibbles(codes, ASM: tl.constexpr):
    """Low and high nibbles of uint8 codes as int8 (on a GPU four bytes at a time)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="and.b32 $0, $2, 0x0F0F0F0F;\n shr.u32 $1, $2, 4;\n and.b32 $1, $1, 0x0F0F0F0F;",
            constraints="=r,=r,r", args=[codes], dtype=(tl.int8, tl.int8), is_pure=True,
            pack=4)
    else:  # the interpreter runs no PTX
        lo = (codes & 15).to(tl.int8)
        hi = (codes >> 4).to(tl.int8)
    return lo, hi


@kernel(do_not_specialize=("M", "C", "WS_N"))
def _int4_estimates_kernel(
    q_ptr, codes_ptr, scale_ptr, zero_ptr, idx_ptr, counts_ptr, starts_ptr, ends_ptr, out_ptr,
    cmax_ptr, ws_ptr,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_cn, stride_sb, stride_sh,
    stride_ib, stride_ih, HKV, M, C, WS_N, sm_scale,
    D2: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr,
    BD2: tl.constexpr, TILES: tl.constexpr, RANGE: tl.constexpr, ASM: tl.constexpr,
    ZB: tl.constexpr,
):
    # one program per (sequence x KV head row, chunk of TILES * BT candidates): the codes of
    # a tile ([BT, d/2] bytes) times the group's int8 query ([d/2, G], even and odd
    # channels) on int8 tensor cores, then scale and zero per candidate; writes float16
    # logits slot-major ([M, G] per row), the chunk's maximum per head, and zeroes a share
    # of the top-p passes' workspace. Per-element offsets are int32 from a per-tile base.
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    j = tl.arange(0, BD2)
    mj = j < D2  # (all true, folded away, when d/2 is a power of two)
    g = tl.arange(0, BG)
    mg = g < G
    qrow = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[None, :] * stride_qh
    mq = mj[:, None] & mg[None, :]
    qe = tl.load(qrow + 2 * j[:, None], mask=mq, other=0.0).to(tl.float32)
    qo = tl.load(qrow + 2 * j[:, None] + 1, mask=mq, other=0.0).to(tl.float32)
    qs = tl.sum(qe + qo, axis=0) * sm_scale
    amax = tl.maximum(tl.max(tl.abs(qe), axis=0), tl.max(tl.abs(qo), axis=0))
    sq = tl.where(amax > 0, amax * INV_Q_, 1.0)
    qi_e = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(qe, sq[None, :] + 0.0 * qe), ASM),
                                 -127.0), 127.0).to(tl.int8)
    qi_o = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(qo, sq[None, :] + 0.0 * qo), ASM),
                                 -127.0), 127.0).to(tl.int8)
    sqs = sq * sm_scale
    if RANGE:
        start = tl.load(starts_ptr + b).to(tl.int32)
        end = tl.load(ends_ptr + b).to(tl.int32)
    else:
        cnt = tl.load(counts_ptr + row).to(tl.int32)
    cbase = codes_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    sbase = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    obase = out_ptr + row.to(tl.int64) * M * G
    ibase = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    r = tl.arange(0, BT)
    mx = tl.full([BT, BG], float("-inf"), tl.float32)
    for t in tl.range(0, TILES):
        first = (c * TILES + t) * BT
        slot = first + r
        inm = slot < M
        if RANGE:  # positions are the slots: offsets from the tile's first row
            live = inm & (slot >= start) & (slot < end)
            crow = cbase + first.to(tl.int64) * stride_cn
            srow = sbase + first
            pos = r
        else:
            live = slot < cnt
            crow = cbase
            srow = sbase
            pos = tl.load(ibase + slot, mask=live, other=0).to(tl.int32)
        codes = tl.load(crow + pos[:, None] * stride_cn + j[None, :],
                        mask=live[:, None] & mj[None, :], other=0)
        lo, hi = _unpack_nibbles(codes, ASM)
        if ASM:
            acc = tl.dot(lo, qi_e, out_dtype=tl.int32)
            acc = tl.dot(hi, qi_o, acc, out_dtype=tl.int32).to(tl.float32)
        else:  # the interpreter: exact in float32 (|acc| < 2**24)
            acc = tl.dot(lo.to(tl.float32), qi_e.to(tl.float32), input_precision="ieee")
            acc = tl.dot(hi.to(tl.float32), qi_o.to(tl.float32), acc, input_precision="ieee")
        sc = tl.load(scale_ptr + srow + pos, mask=live, other=0.0).to(tl.float32)
        ze = tl.load(zero_ptr + srow + pos, mask=live, other=0.0).to(tl.float32)
        s = ze[:, None] * qs[None, :] + sc[:, None] * (acc * sqs[None, :])
        s = tl.minimum(tl.maximum(s, -F16_MAX_), F16_MAX_).to(tl.float16)
        s = tl.where(live[:, None], s, float("-inf"))
        tl.store(obase + first * G + (r[:, None] * G + g[None, :]), s,
                 mask=inm[:, None] & mg[None, :])
        mx = tl.maximum(mx, s.to(tl.float32))
    tl.store(cmax_ptr + (row.to(tl.int64) * C + c) * G + g, tl.max(mx, axis=0), mask=mg)
    if WS_N > 0:  # zero a share of the consumer's workspace
        step = tl.num_programs(0) * tl.num_programs(1) * ZB
        i = (c * tl.num_programs(0) + row) * ZB
        while i < WS_N:
            zz = i + tl.arange(0, ZB)
            tl.store(ws_ptr + zz, tl.zeros([ZB], tl.int64), mask=zz < WS_N)
            i += step


F16_MAX_, INV_Q_ = const(F16_MAX), const(INV_Q)

if tl is not None:  # libdevice math (the interpreter runs numpy's instead)
    from triton.language.extra import libdevice
else:  # pragma: no cover
    libdevice = None


def _estimates_launch(q: Tensor, codes: Tensor, scale: Tensor, zero: Tensor,
                      indices: Tensor | None, counts: Tensor | None, span: KeySpan, m: int,
                      sm_scale: float) -> Estimates:
    """The estimates kernel over an index list (``indices``/``counts``) or, with
    ``indices=None``, over the positions ``[0, m)`` live inside ``span``."""
    q, codes = last_dim_dense(q), last_dim_dense(codes)
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    b, hq, d = q.shape
    hkv = codes.shape[1]
    g = hq // hkv
    dev = q.device
    block_t = max(16, min(INT4_BLOCK_M, next_pow2(m)))
    tiles = max(1, topp_binned.CHUNK // block_t) if m > block_t else 1
    c = cdiv(m, block_t * tiles)
    out = torch.empty(b, hkv, m, g, dtype=torch.float16, device=dev)
    cmax = torch.empty(b, hkv, c, g, dtype=torch.float32, device=dev)
    ws = torch.empty(topp_binned.workspace_numel(b * hkv, g), dtype=torch.int64, device=dev)
    rng = indices is None
    if rng:
        idx, cnt, istr = span.starts, span.starts, (0, 0)
    else:
        idx, cnt = last_dim_dense(indices), counts.contiguous()
        istr = (idx.stride(0), idx.stride(1))
    if m > 0:
        _int4_estimates_kernel[(b * hkv, c)](
            q, codes, scale, zero, idx, cnt, span.starts, span.ends, out, cmax, ws,
            q.stride(0), q.stride(1), *row_strides(codes), scale.stride(0), scale.stride(1),
            *istr, hkv, m, c, ws.numel(), float(sm_scale),
            D2=d // 2, G=g, BG=next_pow2(g), BT=block_t, BD2=max(32, next_pow2(d // 2)),
            TILES=tiles, RANGE=rng,
            ASM=not interpreting(), ZB=256, num_warps=INT4_WARPS, num_stages=INT4_STAGES,
        )
    else:
        ws.zero_()
    return Estimates(out, cmax, span, indices, counts, workspace=ws)


def _check_int4(q: Tensor, codes: Tensor) -> None:
    if codes.shape[-1] * 2 != q.shape[-1]:
        raise ValueError(f"codes hold d/2={codes.shape[-1]} bytes a key but q has "
                         f"d={q.shape[-1]}; quantize the keys of this cache")


def int4_estimates(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    sm_scale: float,
    *,
    span: KeySpan,
    indices: Tensor | None = None,
    counts: Tensor | None = None,
    impl: str = "auto",
) -> Estimates:
    """Estimated logits of each KV head's candidates, slot-major for the top-p kernels.

    The candidates are ``indices [B, Hkv, M]`` (first ``counts [B, Hkv]`` live) or, with
    ``indices=None``, every valid position of ``span`` (slot j is position j). Returns
    :class:`~nucleus_attn.ops.topp.Estimates` (values as :func:`int4_scores_reference`
    gives them) for :func:`~nucleus_attn.ops.topp_select_estimates`.

    Examples
    --------
    >>> k = torch.randn(1, 2, 100, 64)
    >>> codes, sc, ze = quantize_int4(k)
    >>> est = int4_estimates(torch.randn(1, 8, 64), codes, sc, ze, 0.125,
    ...                      span=KeySpan.full(1, 100))
    >>> est.values.shape, est.values.dtype
    (torch.Size([1, 2, 100, 4]), torch.float16)
    """
    _check_int4(q, codes)
    if indices is None:
        if span.n > codes.shape[2] or span.starts.shape[0] != q.shape[0]:
            raise ValueError(f"the span ({span.starts.shape[0]} sequences of N={span.n}) does "
                             f"not fit the int4 keys {tuple(codes.shape)} and q "
                             f"{tuple(q.shape)}")
        n = span.n
        codes, scale, zero = codes[:, :, :n], scale[:, :, :n], zero[:, :, :n]
        m = n
    else:
        m = indices.shape[2]
    if use_triton(impl, q, codes):
        return _estimates_launch(q, codes, scale, zero, indices, counts, span, m, sm_scale)
    hkv = codes.shape[1]
    if indices is None:
        est = int4_scores_range_reference(q, codes, scale, zero, span, sm_scale)
    else:
        est = int4_scores_reference(q, codes, scale, zero, indices, counts, sm_scale)
    return Estimates.from_logits(slot_major(est, hkv).half().contiguous(), span, indices,
                                 counts)


def int4_scores(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    indices: Tensor,
    counts: Tensor,
    sm_scale: float,
    *,
    impl: str = "auto",
) -> Tensor:
    """Estimated candidate logits ``[B, Hq, M]`` float32; see :func:`int4_scores_reference`
    for the contract (Twilight's hot path uses :func:`int4_estimates`)."""
    _check_int4(q, codes)
    if use_triton(impl, q, codes, indices):
        span = KeySpan.full(q.shape[0], codes.shape[2], q.device)
        return _estimates_launch(q, codes, scale, zero, indices, counts, span,
                                 indices.shape[2], sm_scale).head_major()
    return int4_scores_reference(q, codes, scale, zero, indices, counts, sm_scale)


def int4_scores_range(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    span: KeySpan,
    sm_scale: float,
    *,
    impl: str = "auto",
) -> Tensor:
    """Estimated logits ``[B, Hq, N]`` of every valid position; see
    :func:`int4_scores_range_reference`."""
    if use_triton(impl, q, codes):
        return int4_estimates(q, codes, scale, zero, sm_scale, span=span,
                              impl=impl).head_major()
    _check_int4(q, codes)
    n = span.n
    return int4_scores_range_reference(q, codes[:, :, :n], scale[:, :, :n], zero[:, :, :n],
                                       span, sm_scale)
