"""Decode attention: dense (SDPA) and gathered sparse attention over kept indices.

``sparse_attention`` is exact softmax attention restricted to each KV head's kept
positions, shared by the head's query heads (GQA-packed: a kept key/value is read once per
group). ``gathered_scores`` gives exact logits over an index set (oracles, Tactic's
sampled segments, diagnostics).
"""

from __future__ import annotations

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
    num_sms,
    row_strides,
    tl,
    use_triton,
)

LOG2E = 1.4426950408889634


def _gather_rows(x: Tensor, indices: Tensor) -> Tensor:
    """``x[b, h, indices[b, h, m], :]`` as ``[B, Hkv, M, d]``."""
    b, h, m = indices.shape
    return x.gather(2, indices[..., None].expand(b, h, m, x.shape[-1]))


# --- dense -------------------------------------------------------------------------------

def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, span: KeySpan | None, scale: float, *,
    impl: str = "auto",
) -> Tensor:
    """Exact decode attention over every valid key, GQA without repeating KV heads.

    Without a span: torch SDPA with no mask (flash / cuDNN on a GPU, the fastest dense
    path). With a span: on CUDA the Triton range kernel (:func:`dense_attention_triton`),
    elsewhere SDPA with the span's mask.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    k, v : Tensor
        ``[B, Hkv, N, d]``.
    span : KeySpan or None
        Valid keys; None means all N positions of every sequence (no mask, fastest).
    scale : float
        Softmax scale.

    Returns
    -------
    Tensor
        ``[B, Hq, d]`` in q's dtype.
    """
    if span is not None and use_triton(impl, q, k, v):
        return dense_attention_triton(q, k, v, span, scale)
    mask = None if span is None else span.valid_mask()[:, None, None, :]
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return out[:, :, 0, :]


# --- exact logits over an index set ------------------------------------------------------

def gathered_scores_reference(
    q: Tensor, k: Tensor, indices: Tensor, counts: Tensor, scale: float
) -> Tensor:
    """Exact logits ``scale * q . k`` over each KV head's indexed keys.

    ``q [B, Hq, d]``, ``k [B, Hkv, N, d]``, ``indices [B, Hkv, M]``, ``counts [B, Hkv]``;
    returns ``[B, Hq, M]`` float32, ``-inf`` past counts.
    """
    b, hq, d = q.shape
    hkv, m = indices.shape[1], indices.shape[2]
    # reads: counts * d key values per KV head, once for the whole group
    kg = _gather_rows(k, indices).float()
    s = torch.einsum("bhgd,bhmd->bhgm", q.float().view(b, hkv, hq // hkv, d), kg) * scale
    live = (torch.arange(m, device=q.device) < counts[..., None])[:, :, None]
    return torch.where(live, s, torch.full_like(s, float("-inf"))).view(b, hq, m)


@kernel
def _gathered_scores_kernel(
    q_ptr, k_ptr, idx_ptr, counts_ptr, out_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_ib, stride_ih,
    HKV, M, D, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program per (sequence, KV head, BLOCK_M indexed keys), scored for the whole group
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    cnt = tl.load(counts_ptr + bh)
    slot = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = (slot < cnt) & (slot < M)
    idx = tl.load(idx_ptr + b.to(tl.int64) * stride_ib + h * stride_ih + slot, mask=live,
                  other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    kbase = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    kt = tl.load(kbase + idx[:, None] * stride_kn + offs_d[None, :],
                 mask=live[:, None] & md[None, :], other=0.0)
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    qt = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * GROUP + g)[:, None] * stride_qh
                 + offs_d[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    if DOT_F32:
        s = tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(qt, tl.trans(kt.to(qt.dtype)))
    s = tl.where(live[None, :], s * scale, float("-inf"))
    out = out_ptr + (b.to(tl.int64) * HKV * GROUP + h * GROUP + g[:, None]) * M + slot[None, :]
    tl.store(out, s, mask=mg[:, None] & (slot < M)[None, :])


def gathered_scores_triton(
    q: Tensor, k: Tensor, indices: Tensor, counts: Tensor, scale: float
) -> Tensor:
    """Triton version of :func:`gathered_scores_reference` (same contract)."""
    q, k, indices = last_dim_dense(q), last_dim_dense(k), last_dim_dense(indices)
    counts = counts.contiguous()
    b, hq, d = q.shape
    hkv, m = indices.shape[1], indices.shape[2]
    out = torch.empty(b, hq, m, dtype=torch.float32, device=q.device)
    if m == 0:
        return out
    g = hq // hkv
    block_d = max(16, next_pow2(d))
    block_m = max(16, min(64, 8192 // block_d, next_pow2(m)))
    _gathered_scores_kernel[(b * hkv, cdiv(m, block_m))](
        q, k, indices, counts, out, q.stride(0), q.stride(1), *row_strides(k),
        indices.stride(0), indices.stride(1), hkv, m, d, float(scale),
        GROUP=g, BLOCK_G=dot_block(g), BLOCK_M=block_m, BLOCK_D=block_d,
        DOT_F32=dot_in_f32(q, k), num_warps=4,
    )
    return out


def gathered_scores(
    q: Tensor, k: Tensor, indices: Tensor, counts: Tensor, scale: float, *, impl: str = "auto"
) -> Tensor:
    """Exact logits over index sets; see :func:`gathered_scores_reference`."""
    _check_gqa(q, k, indices, counts)
    if use_triton(impl, q, k, indices):
        return gathered_scores_triton(q, k, indices, counts, scale)
    return gathered_scores_reference(q, k, indices, counts, scale)


# --- sparse attention --------------------------------------------------------------------

def sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor, scale: float
) -> Tensor:
    """Exact attention restricted to kept positions, fp32 accumulation.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    k, v : Tensor
        ``[B, Hkv, N, d]``.
    indices : Tensor
        ``[B, Hkv, M]`` int64 kept positions; the first ``counts`` are live.
    counts : Tensor
        ``[B, Hkv]`` int64, each >= 1.
    scale : float
        Softmax scale.

    Returns
    -------
    Tensor
        ``[B, Hq, d]`` in q's dtype.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    # reads: counts * 2 * d values per KV head, once for the whole group
    s = gathered_scores_reference(q, k, indices, counts, scale).view(b, hkv, hq // hkv, -1)
    probs = torch.softmax(s, dim=-1)
    out = torch.einsum("bhgm,bhmd->bhgd", probs, _gather_rows(v, indices).float())
    return out.reshape(b, hq, v.shape[-1]).to(q.dtype)


@kernel
def _sparse_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, counts_ptr, o_part_ptr, m_part_ptr, l_part_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih, HKV, M, D, SPLITS, qk_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, CONTIG: tl.constexpr, STAGES: tl.constexpr,
):
    # one program per (sequence, KV head, split): online softmax over its share of the
    # head's kept list for all the group's query heads at once (each K/V row read once);
    # the share is a multiple of BLOCK_N so that ragged counts only leave splits empty.
    # CONTIG (dense decode over a key span): idx_ptr holds each sequence's first valid
    # position and counts_ptr its number of valid keys; the positions are a range
    row = tl.program_id(0)
    sp = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    if CONTIG:
        cnt = tl.load(counts_ptr + b).to(tl.int32)
        first = tl.load(idx_ptr + b).to(tl.int64)
    else:
        cnt = tl.minimum(tl.load(counts_ptr + row), M).to(tl.int32)
        first = 0
    per = tl.cdiv(tl.cdiv(cnt, SPLITS), BLOCK_N) * BLOCK_N
    start = sp * per
    end = tl.minimum(cnt, start + per)
    g = tl.arange(0, BLOCK_G)
    mg = g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    qt = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * GROUP + g)[:, None] * stride_qh
                 + offs_d[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    if DOT_F32:
        qt = qt.to(tl.float32)
    kbase = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    vbase = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    ibase = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # software-pipelined: the positions and K/V rows of the next tiles load while this
    # tile is computed
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs = n0 + tl.arange(0, BLOCK_N)
        mn = offs < end
        if CONTIG:  # noqa: SIM108 (a constexpr branch: the other side is never compiled)
            idx = first + offs
        else:
            idx = tl.load(ibase + offs, mask=mn, other=0).to(tl.int64)
        mkv = mn[:, None] & md[None, :]
        kt = tl.load(kbase + idx[:, None] * stride_kn + offs_d[None, :], mask=mkv, other=0.0)
        vt = tl.load(vbase + idx[:, None] * stride_vn + offs_d[None, :], mask=mkv, other=0.0)
        if DOT_F32:
            s = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(kt.to(qt.dtype)))
        s = tl.where(mn[None, :], s * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    hq_row = row.to(tl.int64) * GROUP + g  # = b * Hq + query head
    part = hq_row * SPLITS + sp
    tl.store(o_part_ptr + part[:, None] * D + offs_d[None, :], acc,
             mask=mg[:, None] & md[None, :])
    tl.store(m_part_ptr + part, m_i, mask=mg)
    tl.store(l_part_ptr + part, l_i, mask=mg)


@kernel
def _sparse_attention_merge_kernel(
    o_part_ptr, m_part_ptr, l_part_ptr, out_ptr, D, SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (sequence, query head): rescale and add the splits' partial sums
    r = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    ms = sp < SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    part = r.to(tl.int64) * SPLITS + sp
    m = tl.load(m_part_ptr + part, mask=ms, other=float("-inf"))
    lsum = tl.load(l_part_ptr + part, mask=ms, other=0.0)
    o = tl.load(o_part_ptr + part[:, None] * D + offs_d[None, :], mask=ms[:, None] & md[None, :],
                other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - mx), 0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * lsum, axis=0)
    tl.store(out_ptr + r.to(tl.int64) * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=md)


# launch configuration of the split kernel (tuned on an H100 at the Llama-3-8B shape)
BLOCK_N = 64  # kept tokens per tile (16-bit inputs, d <= 128)
SPLIT_WARPS = 4
STAGES = 3  # software-pipelining depth of the tile loop
PROGRAMS_PER_SM = 32  # splits are chosen to give about this many programs per SM
MAX_SPLITS = 64  # partial results the merge kernel holds at once


def attention_splits(rows: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Splits per KV head: enough programs to fill the GPU, none idle at full capacity."""
    want = cdiv(PROGRAMS_PER_SM * num_sms(device), max(rows, 1))
    return max(1, min(want, cdiv(capacity, block_n), MAX_SPLITS))


def sparse_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor, scale: float
) -> Tensor:
    """Triton version of :func:`sparse_attention_reference` (flash-decoding: the kept list
    of each KV head is split over several programs, then the partial softmaxes merge)."""
    indices, counts = last_dim_dense(indices), counts.contiguous()
    return _split_and_merge(q, k, v, indices, counts, indices.shape[2], scale,
                            (indices.stride(0), indices.stride(1)), BLOCK_N, contig=False)


# dense decode over a span reads contiguous rows: larger tiles than the gathered kernel
# (H200, N=128k, bf16, d=128: 128 rows a tile reach 3.6-3.9 TB/s, 64 rows 2.7-3.6;
# scripts/tune_decode_kernels.py)
DENSE_BLOCK_N = 128


def dense_attention_triton(q: Tensor, k: Tensor, v: Tensor, span: KeySpan, scale: float) -> Tensor:
    """Triton flash-decoding over each sequence's valid range ``[starts, ends)``: exact
    dense decode for padded or pre-allocated (static) caches without building a mask or
    repeating KV heads, and free of host syncs (the range is read on the device)."""
    return _split_and_merge(q, k, v, span.starts.contiguous(), span.lengths.contiguous(),
                            k.shape[2], scale, (0, 0), DENSE_BLOCK_N, contig=True)


def _split_and_merge(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, counts: Tensor, m: int,
                     scale: float, idx_strides: tuple[int, int], block_n: int,
                     contig: bool) -> Tensor:
    """Launch the split kernel over ``m`` positions per KV head (a kept list, or with
    ``contig`` each sequence's range: ``idx`` its starts, ``counts`` its lengths), then
    merge the splits' partial softmaxes."""
    q, k, v = last_dim_dense(q), last_dim_dense(k), last_dim_dense(v)
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    block_d = max(16, next_pow2(d))
    f32 = dot_in_f32(q, k, v)
    block_n = block_n if block_d <= 128 and not f32 else 32
    splits = attention_splits(b * hkv, m, block_n, q.device)
    o_part = torch.empty(b * hq, splits, d, dtype=torch.float32, device=q.device)
    m_part = torch.empty(b * hq, splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _sparse_attention_split_kernel[(b * hkv, splits)](
        q, k, v, idx, counts, o_part, m_part, l_part, q.stride(0), q.stride(1),
        *row_strides(k), *row_strides(v), *idx_strides, hkv, m, d, splits,
        float(scale) * LOG2E, GROUP=g, BLOCK_G=dot_block(g), BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_F32=f32, CONTIG=contig, STAGES=STAGES,
        num_warps=SPLIT_WARPS if not f32 else 8,
    )
    _sparse_attention_merge_kernel[(b * hq,)](
        o_part, m_part, l_part, out, d, splits,
        BLOCK_S=next_pow2(splits), BLOCK_D=next_pow2(d), num_warps=4,
    )
    return out


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    counts: Tensor,
    scale: float,
    *,
    impl: str = "auto",
) -> Tensor:
    """Gathered sparse decode attention; see :func:`sparse_attention_reference`.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 4, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    >>> idx = torch.arange(10).expand(1, 2, 10)
    >>> sparse_attention(q, k, v, idx, torch.full((1, 2), 10), 0.125).shape
    torch.Size([1, 4, 64])
    """
    _check_gqa(q, k, indices, counts)
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if use_triton(impl, q, k, v, indices):
        return sparse_attention_triton(q, k, v, indices, counts, scale)
    return sparse_attention_reference(q, k, v, indices, counts, scale)


def _check_gqa(q: Tensor, k: Tensor, indices: Tensor, counts: Tensor) -> None:
    b, hq, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[-1] != d or hq % k.shape[1]:
        raise ValueError(f"k must be [B={b}, Hkv, N, d={d}] with Hkv dividing Hq={hq}, got "
                         f"{tuple(k.shape)}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (b, k.shape[1]):
        raise ValueError(f"indices must be [B={b}, Hkv={k.shape[1]}, M], got "
                         f"{tuple(indices.shape)}")
    if tuple(counts.shape) != (b, k.shape[1]):
        raise ValueError(f"counts must be [B={b}, Hkv={k.shape[1]}], got {tuple(counts.shape)}")
