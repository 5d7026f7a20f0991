"""Top-p (nucleus) selection: the smallest set of candidates whose softmax mass reaches p.

The threshold is found by bisection, not by sorting: with non-negative weights
``w_i = exp(l_i - max l)``, the kept set for a threshold t is ``{i : w_i >= t}`` and its
mass only shrinks as t grows, so the largest t whose mass still reaches ``p * sum(w)`` is
found by halving an interval. Bisecting over the *bit patterns* of float32 (which order
like the values for non-negative floats) ends on an exact weight after at most 31 steps,
so the result equals the sort-based definition, ties at the threshold aside (all tied
weights are kept). Each step is one masked sum per row: no sort, no host sync.

The Triton path has two kernels. Rows of at least ``topp_split.SPLIT_MIN_M`` candidates
(and p < 1) take :mod:`nucleus_attn.ops.topp_split`: each row split over many programs,
two histogram passes bracket the threshold and it is found exactly among the few weights
left, starting from the per-chunk :class:`ScoreStats` of the kernel that wrote the
logits. Shorter rows take one program per query head that runs the 32 bisection steps
in registers. Either way the sums are added in another order than torch's, so where a
candidate mass equals the target to within float32 rounding (a relative 1e-7 or so) the
paths may settle on neighbouring weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..span import KeySpan
from . import topp_split
from ._dispatch import HandsWorkspace, cdiv, interpreting, kernel, next_pow2, tl, use_triton
from .select import compact

BISECT_STEPS = 32  # bit patterns of weights in [0, 1] span < 2**31 values
CHUNK = 4096  # row elements a threshold program handles at once
SURVIVORS = 16384  # weights inside the bisection bracket that are bisected in registers
KEEP_CHUNK = 1024  # candidates per program of the keep/compaction kernel
STATS_CHUNK = 1024  # candidates per chunk of the reference's ScoreStats


@dataclass(frozen=True)
class ScoreStats(HandsWorkspace):
    """Softmax statistics of score rows, per chunk of candidates, from the kernel that wrote
    the scores (so that the top-p search need not read the rows once more to get them).

    Attributes
    ----------
    chunk : int
        Candidates per chunk: slot ``j`` of a row is in chunk ``j // chunk``.
    max : Tensor
        ``[B, Hq, C]`` float32 largest logit of each chunk (``-inf`` when none is live).
    sumexp : Tensor
        ``[B, Hq, C]`` float32 ``sum(exp(l - max))`` over the chunk (0 when none is live).

    Notes
    -----
    A producer kernel may also hand over ``workspace``: the zeroed int32 counters the top-p
    kernel needs (zeroed inside the producer's own launch, which saves a memset launch).
    It is used at most once; a second :func:`topp_select` on the same stats allocates its
    own.
    """

    chunk: int
    max: Tensor
    sumexp: Tensor

    def row_max_total(self) -> tuple[Tensor, Tensor]:
        """``[B, Hq]`` row maximum (0 for rows without a live logit) and the row's
        ``sum(exp(l - max))``, combined from the chunks."""
        m = self.max.amax(-1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        scaled = torch.where(torch.isfinite(self.max), torch.exp(self.max - m[..., None]),
                             torch.zeros_like(self.max))
        return m, (self.sumexp * scaled).sum(-1)


def score_stats(logits: Tensor, chunk: int = STATS_CHUNK) -> ScoreStats:
    """Reference :class:`ScoreStats` of ``[B, Hq, M]`` logits (``-inf`` = not live)."""
    b, hq, m = logits.shape
    c = max(1, -(-m // chunk))
    x = torch.nn.functional.pad(logits.float(), (0, c * chunk - m), value=float("-inf"))
    x = x.view(b, hq, c, chunk)
    mx = x.amax(-1)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return ScoreStats(chunk, mx, torch.exp(x - safe[..., None]).sum(-1))


def topp_threshold_reference(w: Tensor, p: float) -> Tensor:
    """Largest threshold t per row with ``sum(w[w >= t]) >= p * sum(w)``.

    Parameters
    ----------
    w : Tensor
        ``[R, M]`` float32 weights, >= 0 (0 for padding), at most 1.
    p : float
        Target mass in (0, 1].

    Returns
    -------
    Tensor
        ``[R]`` float32 thresholds; keep ``w >= t``.
    """
    # reads: the row once per step (BISECT_STEPS passes over R * M floats)
    target = p * w.sum(-1)
    lo = torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)
    hi = w.amax(-1).view(torch.int32).to(torch.int64) + 1
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) // 2
        t = mid.to(torch.int32).view(torch.float32)
        mass = torch.where(w >= t[:, None], w, torch.zeros_like(w)).sum(-1)
        ok = mass >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo.to(torch.int32).view(torch.float32)


def topp_weights(logits: Tensor) -> Tensor:
    """``exp(l - max l)`` per row, 0 where the logit is ``-inf`` (rows of only -inf give 0)."""
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(logits - m)


def topp_select_reference(
    logits: Tensor,
    indices: Tensor,
    counts: Tensor,
    p: float,
    forced: Tensor | None = None,
    *,
    span: KeySpan | None = None,
    sink: int = 0,
    window: int = 0,
) -> tuple[Tensor, Tensor]:
    """Keep, per KV head, the union of its query heads' nucleus sets (plus forced items).

    Parameters
    ----------
    logits : Tensor
        ``[B, Hq, M]`` float32 logits of each KV head's candidates, ``-inf`` past counts.
    indices : Tensor
        ``[B, Hkv, M]`` int64 candidate positions.
    counts : Tensor
        ``[B, Hkv]`` int64 live candidates.
    p : float
        Target mass in (0, 1]: each query head keeps the smallest set of candidates
        whose softmax mass (over its candidates) reaches p.
    forced : Tensor, optional
        ``[B, Hkv, M]`` bool candidates kept regardless.
    span, sink, window : KeySpan, int, int
        Also keep, regardless, candidates at the first ``sink`` / last ``window`` valid
        positions of ``span`` (decided from the positions themselves: no mask tensor).

    Returns
    -------
    kept : Tensor
        ``[B, Hkv, M]`` int64 kept positions (ascending in candidate order), first
        ``kept_counts`` live, 0 after them.
    kept_counts : Tensor
        ``[B, Hkv]`` int64.
    """
    b, hq, m = logits.shape
    hkv = indices.shape[1]
    # reads: the logits BISECT_STEPS + 2 times, the indices once; writes the kept indices
    live = torch.arange(m, device=logits.device) < counts[..., None]  # [B, Hkv, M]
    live_q = live.repeat_interleave(hq // hkv, dim=1)
    w = topp_weights(torch.where(live_q, logits.float(), float("-inf")))
    t = topp_threshold_reference(w.view(b * hq, m), p).view(b, hq, 1)
    keep = ((w >= t) & live_q).view(b, hkv, hq // hkv, m).any(2)
    if forced is not None:
        keep |= forced & live
    if span is not None and (sink or window):
        keep |= span.forced(indices, sink, window) & live
    return compact(indices, keep)


@kernel
def _topp_threshold_kernel(
    x_ptr, counts_ptr, thr_ptr, keep_ptr, scratch_ptr, M, GROUP, p,
    WEIGHTS: tl.constexpr, CHUNK: tl.constexpr, SMALL: tl.constexpr, STEPS: tl.constexpr,
    EXACT_EXP: tl.constexpr,
):
    # One program per (sequence, query head) row, streaming the row in CHUNKs. x holds
    # weights (WEIGHTS, all M live) or logits (the first counts[b, h // GROUP] live; the
    # row's nucleus w >= t is then written as an int8 mask for the union over the group).
    # The bisection keeps a bracket [lo, hi) of bit patterns with ok(lo) and not ok(hi),
    # ok(t) = mass(w >= t) >= p * sum(w). It starts at lo0 = (1 - p) * sum(w) / n (all
    # weights below it hold less than 1 - p of the mass). Weights >= hi are kept whatever
    # t is and weights < lo never are, so only the weights inside the bracket matter: the
    # row is streamed for a bisection step while more than SMALL of them remain, then they
    # are packed into SMALL slots and the remaining steps run in registers.
    # (while loops: the 3.6 interpreter cannot run range(runtime int))
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * M
    neg = 0.0 if WEIGHTS else float("-inf")
    if WEIGHTS:
        n_live = M
        mx = 0.0
    else:
        n_live = tl.minimum(tl.load(counts_ptr + row // GROUP), M)
        mx = float("-inf")
        c0 = 0
        while c0 < M:
            offs = c0 + tl.arange(0, CHUNK)
            mx = tl.maximum(mx, tl.max(tl.load(base + offs, mask=offs < n_live, other=neg),
                                       axis=0))
            c0 += CHUNK
        mx = tl.where(mx > float("-inf"), mx, 0.0)
    # weights are recomputed from x in every pass; libdevice's expf gives the bits of
    # torch.exp on CUDA, so every pass (and the reference) sees the same weights
    total = 0.0
    wmax = 0.0
    c0 = 0
    while c0 < M:
        offs = c0 + tl.arange(0, CHUNK)
        x = tl.load(base + offs, mask=offs < n_live, other=neg)
        w = x if WEIGHTS else libdevice.exp(x - mx) if EXACT_EXP else tl.exp(x - mx)
        total += tl.sum(w, axis=0)
        wmax = tl.maximum(wmax, tl.max(w, axis=0))
        c0 += CHUNK
    target = p * total
    hi = wmax.to(tl.int32, bitcast=True) + 1
    lo0 = (1.0 - p) * total / tl.maximum(n_live, 1).to(tl.float32) * 0.99999
    lo = tl.minimum(lo0.to(tl.int32, bitcast=True), hi - 1)
    n_in = (n_live + 1).to(tl.int32)  # inside [lo, hi): not counted yet, so one pass at least
    steps = 0
    while (n_in > SMALL) & (steps < STEPS):  # streamed bisection steps
        mid = (lo + hi) // 2
        t_mid = mid.to(tl.float32, bitcast=True)
        t_lo = lo.to(tl.float32, bitcast=True)
        t_hi = hi.to(tl.float32, bitcast=True)
        mass = 0.0
        n_low = 0  # weights in [lo, mid)
        n_high = 0  # weights in [mid, hi)
        c0 = 0
        while c0 < M:
            offs = c0 + tl.arange(0, CHUNK)
            x = tl.load(base + offs, mask=offs < n_live, other=neg)
            w = x if WEIGHTS else libdevice.exp(x - mx) if EXACT_EXP else tl.exp(x - mx)
            live = offs < n_live
            mass += tl.sum(tl.where(w >= t_mid, w, 0.0), axis=0)
            n_low += tl.sum((live & (w >= t_lo) & (w < t_mid)).to(tl.int32), axis=0)
            n_high += tl.sum((live & (w >= t_mid) & (w < t_hi)).to(tl.int32), axis=0)
            c0 += CHUNK
        ok = mass >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
        n_in = tl.where(ok, n_high, n_low)
        steps += 1
    # pack the weights inside the bracket; the mass at or above hi is a constant
    t_lo = lo.to(tl.float32, bitcast=True)
    t_hi = hi.to(tl.float32, bitcast=True)
    sbase = scratch_ptr + row.to(tl.int64) * SMALL
    above = 0.0
    packed = 0
    c0 = 0
    while c0 < M:
        offs = c0 + tl.arange(0, CHUNK)
        x = tl.load(base + offs, mask=offs < n_live, other=neg)
        w = x if WEIGHTS else libdevice.exp(x - mx) if EXACT_EXP else tl.exp(x - mx)
        inside = (offs < n_live) & (w >= t_lo) & (w < t_hi)
        above += tl.sum(tl.where(w >= t_hi, w, 0.0), axis=0)
        dst = packed + tl.cumsum(inside.to(tl.int32), axis=0) - 1
        tl.store(sbase + dst, w, mask=inside & (dst < SMALL))
        packed += tl.sum(inside.to(tl.int32), axis=0)
        c0 += CHUNK
    tl.debug_barrier()  # the packed weights were written by other threads of this program
    so = tl.arange(0, SMALL)
    ws = tl.load(sbase + so, mask=so < packed, other=0.0)
    for _ in range(STEPS):  # (steps past convergence leave lo and hi unchanged)
        mid = (lo + hi) // 2
        t = mid.to(tl.float32, bitcast=True)
        ok = above + tl.sum(tl.where(ws >= t, ws, 0.0), axis=0) >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    thr = lo.to(tl.float32, bitcast=True)
    tl.store(thr_ptr + row, thr)
    if not WEIGHTS:
        kbase = keep_ptr + row.to(tl.int64) * M
        c0 = 0
        while c0 < M:
            offs = c0 + tl.arange(0, CHUNK)
            x = tl.load(base + offs, mask=offs < n_live, other=neg)
            w = libdevice.exp(x - mx) if EXACT_EXP else tl.exp(x - mx)
            tl.store(kbase + offs, ((w >= thr) & (offs < n_live)).to(tl.int8), mask=offs < M)
            c0 += CHUNK


@kernel
def _topp_keep_kernel(
    keepq_ptr, idx_ptr, counts_ptr, forced_ptr, starts_ptr, ends_ptr,
    chunk_ptr, kept_ptr, kept_counts_ptr,
    stride_ib, stride_ih, stride_fb, stride_fh, HKV, M, NCH, sink, window,
    GROUP: tl.constexpr, CHUNK: tl.constexpr, NCH_BLOCK: tl.constexpr,
    HAS_FORCED: tl.constexpr, HAS_SPAN: tl.constexpr, PHASE: tl.constexpr,
):
    # one program per (sequence, KV head, CHUNK candidates): the union of the group's
    # int8 nucleus masks plus the forced candidates. PHASE 0 counts the kept candidates of
    # the chunk; PHASE 1 recomputes the same decisions and writes them at their place
    # (the counts of the chunks before it give the offset)
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    n_live = tl.minimum(tl.load(counts_ptr + row), M)
    slot = c * CHUNK + tl.arange(0, CHUNK)
    live = slot < n_live
    keep = slot < 0
    for j in range(GROUP):
        qrow = row.to(tl.int64) * GROUP + j
        keep = keep | (tl.load(keepq_ptr + qrow * M + slot, mask=live, other=0) != 0)
    ibase = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    if HAS_FORCED:
        fbase = forced_ptr + b.to(tl.int64) * stride_fb + h.to(tl.int64) * stride_fh
        keep = keep | ((tl.load(fbase + slot, mask=live, other=0) != 0) & live)
    if HAS_SPAN or PHASE == 1:
        pos = tl.load(ibase + slot, mask=slot < M, other=0).to(tl.int64)
    if HAS_SPAN:
        start = tl.load(starts_ptr + b)
        end = tl.load(ends_ptr + b)
        near = (pos < start + sink) | (pos >= end - window)
        keep = keep | (live & (pos >= start) & (pos < end) & near)
    if PHASE == 0:
        tl.store(chunk_ptr + row.to(tl.int64) * NCH + c, tl.sum(keep.to(tl.int32), axis=0))
    else:
        cc = tl.arange(0, NCH_BLOCK)
        counts = tl.load(chunk_ptr + row.to(tl.int64) * NCH + cc, mask=cc < NCH, other=0)
        before = tl.sum(tl.where(cc < c, counts, 0), axis=0)
        total = tl.sum(counts, axis=0)
        dst = before + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        kbase = kept_ptr + row.to(tl.int64) * M
        tl.store(kbase + dst, pos, mask=keep)
        tl.store(kbase + slot, tl.zeros_like(pos), mask=(slot >= total) & (slot < M))
        tl.store(kept_counts_ptr + row, total.to(tl.int64), mask=c == 0)


if tl is not None:  # libdevice math (the interpreter runs numpy's instead)
    from triton.language.extra import libdevice
else:  # pragma: no cover
    libdevice = None


def _threshold_launch(x: Tensor, counts: Tensor | None, m: int, group: int, p: float,
                      weights: bool) -> tuple[Tensor, Tensor]:
    """Thresholds ``[R]`` and (for logits) the per-row int8 keep masks ``[R, M]``."""
    rows = x.shape[0] if weights else x.shape[0] * x.shape[1]
    dev = x.device
    thr = torch.empty(rows, dtype=torch.float32, device=dev)
    keep = thr if weights else torch.empty(rows, m, dtype=torch.int8, device=dev)
    chunk = min(next_pow2(m), CHUNK)
    small = min(next_pow2(m), SURVIVORS)
    scratch = torch.empty(rows, small, dtype=torch.float32, device=dev)
    _topp_threshold_kernel[(rows,)](
        x, counts if counts is not None else thr, thr, keep, scratch, m, group, float(p),
        WEIGHTS=weights, CHUNK=chunk, SMALL=small, STEPS=BISECT_STEPS,
        EXACT_EXP=not interpreting(), num_warps=max(4, min(8, chunk // 512)),
    )
    return thr, keep


def topp_threshold(w: Tensor, p: float, *, impl: str = "auto") -> Tensor:
    """Nucleus thresholds of weight rows; see :func:`topp_threshold_reference`."""
    if w.dim() != 2 or w.dtype != torch.float32:
        raise ValueError(f"w must be [R, M] float32 weights, got {tuple(w.shape)} {w.dtype}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p={p} must be in (0, 1]")
    if w.shape[1] == 0 or not use_triton(impl, w):
        return topp_threshold_reference(w, p)
    return _threshold_launch(w.contiguous(), None, w.shape[1], 1, p, True)[0]


def topp_select_triton(
    logits: Tensor,
    indices: Tensor,
    counts: Tensor,
    p: float,
    forced: Tensor | None = None,
    *,
    span: KeySpan | None = None,
    sink: int = 0,
    window: int = 0,
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`topp_select_reference` (same contract; see the module doc
    for the rounding tolerance)."""
    b, hq, m = logits.shape
    hkv = indices.shape[1]
    g = hq // hkv
    dev = logits.device
    logits = logits.contiguous()
    counts = counts.contiguous()
    if indices.stride(-1) != 1:
        indices = indices.contiguous()
    kept = torch.empty(b, hkv, m, dtype=torch.int64, device=dev)
    kept_counts = torch.empty(b, hkv, dtype=torch.int64, device=dev)
    if m == 0:
        return kept, kept_counts.zero_()
    _, keep_q = _threshold_launch(logits, counts, m, g, p, False)
    nch = cdiv(m, KEEP_CHUNK)
    chunk_counts = torch.empty(b * hkv, nch, dtype=torch.int32, device=dev)
    has_span = span is not None and bool(sink or window)
    if forced is not None and forced.stride(-1) != 1:
        forced = forced.contiguous()
    fstride = (forced.stride(0), forced.stride(1)) if forced is not None else (0, 0)
    starts = span.starts if has_span else counts
    ends = span.ends if has_span else counts
    for phase in (0, 1):
        _topp_keep_kernel[(b * hkv, nch)](
            keep_q, indices, counts, forced if forced is not None else counts,
            starts, ends, chunk_counts, kept, kept_counts,
            indices.stride(0), indices.stride(1), *fstride, hkv, m, nch, sink, window,
            GROUP=g, CHUNK=KEEP_CHUNK, NCH_BLOCK=next_pow2(nch),
            HAS_FORCED=forced is not None, HAS_SPAN=has_span, PHASE=phase, num_warps=4,
        )
    return kept, kept_counts


def topp_select(
    logits: Tensor,
    indices: Tensor,
    counts: Tensor,
    p: float,
    forced: Tensor | None = None,
    *,
    span: KeySpan | None = None,
    sink: int = 0,
    window: int = 0,
    stats: ScoreStats | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Nucleus selection per KV head; see :func:`topp_select_reference` for the contract.

    ``stats`` (optional) are the logits' per-chunk softmax statistics from the kernel that
    wrote them (``int4_scores(..., stats=True)``); the result does not depend on them.
    """
    b, hq, m = logits.shape
    if indices.shape[0] != b or indices.shape[2] != m or hq % indices.shape[1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, Hq, M] over indices "
                         f"[B, Hkv, M], got indices {tuple(indices.shape)}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p={p} must be in (0, 1]; use p=1.0 to keep every candidate")
    if forced is not None and forced.shape != indices.shape:
        raise ValueError(f"forced {tuple(forced.shape)} must have the shape of indices "
                         f"{tuple(indices.shape)}")
    _check_stats(stats, logits)
    if use_triton(impl, logits, indices):
        if p < 1.0 and topp_split.split_wanted(m, b * hq, device=logits.device):
            hkv = indices.shape[1]

            def live() -> Tensor:  # (only built when the stats must be computed here)
                return torch.arange(m, device=logits.device) < counts.repeat_interleave(
                    hq // hkv, dim=1)[..., None]
            x, smax, ssum, ws = _split_inputs(logits, stats, live, b * hkv, hq // hkv)
            return topp_split.topp_split(x, hkv, p, smax, ssum, ws, indices=indices,
                                         counts=counts, forced=forced, span=span, sink=sink,
                                         window=window)
        return topp_select_triton(logits, indices, counts, p, forced, span=span, sink=sink,
                                  window=window)
    return topp_select_reference(logits, indices, counts, p, forced, span=span, sink=sink,
                                 window=window)


def _split_inputs(logits: Tensor, stats: ScoreStats | None, live: Callable[[], Tensor],
                  rows: int, group: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """float32 contiguous logits, their per-chunk max and sum of exp (the producer's, or
    computed here over the live candidates, ``live()`` a ``[B, Hq or 1, M]`` mask) and the
    producer's zeroed workspace if any."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    x = x.contiguous()
    if stats is None:
        stats = score_stats(torch.where(live(), x, torch.full_like(x, float("-inf"))))
    ws = stats.take_workspace(topp_split.workspace_numel(rows, group))
    return x, stats.max.contiguous(), stats.sumexp.contiguous(), ws


def _check_stats(stats: ScoreStats | None, logits: Tensor) -> None:
    if stats is None:
        return
    b, hq, m = logits.shape
    c = max(1, -(-m // stats.chunk))
    if stats.max.shape != (b, hq, c) or stats.sumexp.shape != (b, hq, c):
        raise ValueError(f"stats of chunks of {stats.chunk} must be [B, Hq, {c}] for logits "
                         f"{tuple(logits.shape)}, got {tuple(stats.max.shape)}; pass the stats "
                         "returned with these logits")


# --- range mode: every valid position of the cache is a candidate ------------------------

def _range_candidates(logits: Tensor, span: KeySpan,
                      num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The index-list form of range-mode logits: ``[B, Hq, N]`` logits of the valid
    positions first (``-inf`` after them), the positions ``[B, Hkv, N]`` and counts."""
    b, hq, n = logits.shape
    pos = span.positions().expand(b, n)
    cand, cnt = compact(pos, span.valid_mask())  # valid positions first, ascending
    x = logits.float().gather(-1, cand[:, None, :].expand(b, hq, n))
    live = torch.arange(n, device=logits.device) < cnt[:, None, None]
    x = torch.where(live, x, torch.full_like(x, float("-inf")))
    cand = cand[:, None, :].expand(b, num_kv_heads, n)
    return x, cand, cnt[:, None].expand(b, num_kv_heads).contiguous()


def topp_select_range_reference(
    logits: Tensor, span: KeySpan, num_kv_heads: int, p: float, *, sink: int = 0,
    window: int = 0,
) -> tuple[Tensor, Tensor]:
    """:func:`topp_select_reference` where the candidates are every valid position.

    ``logits`` is ``[B, Hq, N]`` over cache positions (slot j is position j); positions
    outside ``span`` are not candidates whatever their logits. Returns kept positions
    ``[B, Hkv, N]`` (ascending, first ``counts`` live, 0 after them) and ``counts [B, Hkv]``.
    """
    # reads: as topp_select_reference, with no index list read (the positions are slots)
    x, cand, cnt = _range_candidates(logits, span, num_kv_heads)
    return topp_select_reference(x, cand, cnt, p, span=span, sink=sink, window=window)


def topp_select_range(
    logits: Tensor,
    span: KeySpan,
    num_kv_heads: int,
    p: float,
    *,
    sink: int = 0,
    window: int = 0,
    stats: ScoreStats | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Nucleus selection per KV head over every valid position (no candidate index list).

    The range form of :func:`topp_select` (see :func:`topp_select_range_reference`):
    Twilight's ``base="dense"``, where the 4-bit estimates of all valid keys
    (:func:`nucleus_attn.ops.int4_scores_range`) are pruned directly.
    """
    b, hq, n = logits.shape
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide Hq={hq}")
    if span.n != n or span.starts.shape[0] != b:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, Hq, N] over the span's "
                         f"B={span.starts.shape[0]} sequences of N={span.n} positions")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p={p} must be in (0, 1]; use p=1.0 to keep every candidate")
    _check_stats(stats, logits)
    if use_triton(impl, logits) and p < 1.0 and topp_split.split_wanted(n, range_mode=True):
        x, smax, ssum, ws = _split_inputs(logits, stats, lambda: span.valid_mask()[:, None, :],
                                          b * num_kv_heads,
                                          hq // num_kv_heads)
        return topp_split.topp_split(x, num_kv_heads, p, smax, ssum, ws, span=span, sink=sink,
                                     window=window)
    # short rows: the index-list path over the valid positions
    x, cand, cnt = _range_candidates(logits, span, num_kv_heads)
    return topp_select(x, cand, cnt, p, span=span, sink=sink, window=window, impl=impl)
