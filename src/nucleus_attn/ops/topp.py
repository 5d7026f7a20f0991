"""Top-p (nucleus) selection: per query head, the smallest set of candidates whose softmax
mass reaches ``p``; per KV head, the union over its query heads.

Two rules live here.

**The exact nucleus** (:func:`topp_nucleus`, the oracle): the threshold ``t`` per row is
the largest weight whose set ``{w >= t}`` still holds ``p`` of the mass, found by
bisection over float32 bit patterns (no sort); tied weights at ``t`` are all kept. Oracle
top-p uses it, and it is the yardstick of the tolerance tests.

**The binned rule** (:func:`topp_select`, what the methods run): two levels of *mass*
histograms bracket the threshold; the kept set is everything above the lower edge of the
finest bin where the cumulative mass crosses ``p``. Per query head, with logits ``x`` of
the live candidates, ``m = max x``, ``w = exp(x - m)``, ``Z = sum w``:

1. the candidates are cut in chunks of ``CHUNK`` slots; ``Z' = sum over chunks of
   exp(chunk max - m)`` is a lower bound of Z that needs no pass over the logits, so every
   weight below ``(1 - p) Z' / n`` (n live candidates) is below the nucleus threshold.
   The log-weights above that, ``u = (m - x) * NB1 / log(n / ((1 - p) Z'))`` in
   ``[0, NB1)``, are binned in ``NB1`` equal steps and each bin's exact mass is summed;
   the crossing bin ``k1`` is the first whose cumulative mass reaches ``p Z``;
2. the crossing bin is cut in ``NB2`` equal sub-bins, their masses summed; the
   crossing sub-bin ``k2`` is where the mass above ``k1`` plus the cumulative sub-bin mass
   reaches ``p Z``. Kept: every candidate of a bin above ``k1``, and of ``k1``'s sub-bins up
   to ``k2``.

Masses are sums of ``w`` in fixed point (``round_down(w * 2**40)`` as int64), so the sums
do not depend on the order of addition: a CUDA-graph replay keeps what an eager step
keeps. The rule guarantees, per query head, that the kept set holds at least ``p`` of the
estimated mass (up to float32 rounding of the weights, a relative 1e-6), and it keeps
what the exact nucleus keeps plus part of one sub-bin: on peaked, flat, sink-dominated,
tied and heavy-tailed rows (``tests/test_ops_topp.py``) at most 2% more tokens than the
union of the exact nuclei, plus 16. The torch reference and the Triton kernels
(:mod:`nucleus_attn.ops.topp_binned`, which also holds the constants ``CHUNK``, ``NB1``,
``NB2`` and ``FIXED``) implement the same rule; they differ only where a weight falls
within float32 rounding of a bin edge.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..span import KeySpan
from . import topp_binned
from ._dispatch import HandsWorkspace, use_triton
from .select import compact

BISECT_STEPS = 32  # bit patterns of weights in [0, 1] span < 2**31 values


# --- candidates' logits, as the top-p kernels read them --------------------------------------

@dataclass(frozen=True)
class Estimates(HandsWorkspace):
    """Logits of each KV head's candidates for its whole query group, in the layout the
    top-p kernels read, with what they need to know about the candidates.

    Made by :func:`nucleus_attn.ops.int4_estimates` (Twilight's pruner) and consumed by
    :func:`topp_select_estimates`.

    Attributes
    ----------
    values : Tensor
        ``[B, Hkv, M, G]`` logits (float16 from the int4 kernel), slot-major: the G query
        heads of one candidate are adjacent. ``-inf`` where a slot is not a candidate.
    chunk_max : Tensor
        ``[B, Hkv, C, G]`` float32 largest live logit of each chunk of ``CHUNK`` slots
        (``-inf`` when none).
    span : KeySpan
        Valid positions of the cache (sink and window are counted from it).
    indices, counts : Tensor or None
        ``[B, Hkv, M]`` int64 candidate positions and ``[B, Hkv]`` live counts; None in range
        mode, where slot j is position j and live inside ``span``.

    Notes
    -----
    The int4 kernel also hands over ``workspace``: the zeroed int64 histograms the top-p
    kernels accumulate into (zeroed inside its own launch). It is used at most once.
    """

    values: Tensor
    chunk_max: Tensor
    span: KeySpan
    indices: Tensor | None = None
    counts: Tensor | None = None

    @staticmethod
    def from_logits(values: Tensor, span: KeySpan, indices: Tensor | None = None,
                    counts: Tensor | None = None) -> Estimates:
        """Slot-major logits ``[B, Hkv, M, G]`` with their chunk maxima computed here (the
        int4 kernel writes its own)."""
        est = Estimates(values, values.new_empty(0), span, indices, counts)
        return dataclasses.replace(est, chunk_max=chunk_maxima(values, est.live()))

    def live(self) -> Tensor:
        """``[B, Hkv, M]`` bool: which slots are candidates."""
        b, hkv, m, _ = self.values.shape
        if self.indices is None:
            valid = self.span.valid_mask()[:, :m]
            return valid[:, None, :].expand(b, hkv, m)
        return torch.arange(m, device=self.values.device) < self.counts[..., None]

    def positions(self) -> Tensor:
        """``[B, Hkv, M]`` int64 position of each slot."""
        if self.indices is not None:
            return self.indices
        b, hkv, m, _ = self.values.shape
        return torch.arange(m, device=self.values.device).expand(b, hkv, m)

    def head_major(self) -> Tensor:
        """``[B, Hq, M]`` float32 logits, ``-inf`` where a slot is not a candidate."""
        b, hkv, m, g = self.values.shape
        x = self.values.float().permute(0, 1, 3, 2)
        x = torch.where(self.live()[:, :, None, :], x, torch.full_like(x, float("-inf")))
        return x.reshape(b, hkv * g, m)


def chunk_maxima(x: Tensor, live: Tensor) -> Tensor:
    """``[B, Hkv, C, G]`` float32 largest live logit per chunk of ``CHUNK`` slots, from
    slot-major logits ``x [B, Hkv, M, G]`` and ``live [B, Hkv, M]``."""
    b, hkv, m, g = x.shape
    chunk = topp_binned.CHUNK
    c = max(1, -(-m // chunk))
    xl = torch.where(live[..., None], x.float(), torch.full((), float("-inf"),
                                                             device=x.device))
    xl = torch.nn.functional.pad(xl, (0, 0, 0, c * chunk - m), value=float("-inf"))
    return xl.view(b, hkv, c, chunk, g).amax(3)


def slot_major(logits: Tensor, num_kv_heads: int) -> Tensor:
    """``[B, Hq, M]`` logits viewed as ``[B, Hkv, M, G]`` (no copy)."""
    b, hq, m = logits.shape
    return logits.view(b, num_kv_heads, hq // num_kv_heads, m).transpose(2, 3)


# --- the exact nucleus (oracle) -----------------------------------------------------------

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


def topp_nucleus(
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
    """Keep, per KV head, the union of its query heads' exact nucleus sets (plus forced
    items): the oracle the binned rule of :func:`topp_select` is measured against.

    Parameters
    ----------
    logits : Tensor
        ``[B, Hq, M]`` logits of each KV head's candidates, ``-inf`` past counts.
    indices : Tensor
        ``[B, Hkv, M]`` int64 candidate positions.
    counts : Tensor
        ``[B, Hkv]`` int64 live candidates.
    p : float
        Target mass in (0, 1]: each query head keeps the smallest set of candidates
        whose softmax mass (over its candidates) reaches p (all weights tied at the
        threshold included).
    forced : Tensor, optional
        ``[B, Hkv, M]`` bool candidates kept regardless.
    span, sink, window : KeySpan, int, int
        Also keep, regardless, candidates at the first ``sink`` / last ``window`` valid
        positions of ``span``.

    Returns
    -------
    kept : Tensor
        ``[B, Hkv, M]`` int64 kept positions (in candidate order), first ``kept_counts``
        live, 0 after them.
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


# --- the binned rule ----------------------------------------------------------------------

def binned_keep_reference(x: Tensor, live: Tensor, p: float) -> Tensor:
    """Which live slots the binned rule keeps for each query head (see the module doc).

    Parameters
    ----------
    x : Tensor
        ``[R, M]`` logits (one query head per row, any float dtype), compared as float32.
    live : Tensor
        ``[R, M]`` bool candidates.
    p : float
        Target mass in (0, 1).

    Returns
    -------
    Tensor
        ``[R, M]`` bool, the query head's kept slots (every live slot of a row without a
        finite live logit).
    """
    r, m = x.shape
    dev = x.device
    chunk, nb1, nb2, fixed = (topp_binned.CHUNK, topp_binned.NB1, topp_binned.NB2,
                              topp_binned.FIXED)
    # reads: the row twice (level 1, then the crossing bin's members)
    xf = torch.where(live, x.float(), torch.full((), float("-inf"), device=dev))
    c = max(1, -(-m // chunk))
    cmax = torch.nn.functional.pad(xf, (0, c * chunk - m), value=float("-inf"))
    cmax = cmax.view(r, c, chunk).amax(-1)
    mx = cmax.amax(-1)  # [R]
    finite = torch.isfinite(mx)
    ms = torch.where(finite, mx, torch.zeros_like(mx))
    zlow = torch.where(torch.isfinite(cmax), torch.exp(cmax - ms[:, None]),
                       torch.zeros_like(cmax)).sum(-1)
    n = live.sum(-1).clamp(min=1).float()
    s1 = nb1 / torch.log(n / ((1.0 - p) * zlow.clamp(min=1.0)))
    u = (ms[:, None] - xf) * s1[:, None]
    binned = live & (u < nb1)
    b1 = torch.clamp(torch.floor(torch.where(binned, u, torch.zeros_like(u))), max=nb1 - 1)
    b1 = b1.to(torch.int64)
    w = torch.exp(xf - ms[:, None])
    fix = torch.where(live & torch.isfinite(w), (w.double() * fixed).floor().to(torch.int64),
                      torch.zeros((), dtype=torch.int64, device=dev))
    target = (p * fix.sum(-1).double()).floor().to(torch.int64)  # [R]
    mass1 = torch.zeros(r, nb1, dtype=torch.int64, device=dev).scatter_add_(
        -1, b1, torch.where(binned, fix, torch.zeros_like(fix)))
    cum1 = torch.cumsum(mass1, -1)
    k1 = (cum1 < target[:, None]).sum(-1).clamp(max=nb1 - 1)  # [R]
    above = cum1.gather(-1, k1[:, None])[:, 0] - mass1.gather(-1, k1[:, None])[:, 0]
    cross = binned & (b1 == k1[:, None])
    sub = torch.floor((u - k1[:, None].float()) * nb2)
    sub = torch.where(cross, sub, torch.zeros_like(sub)).clamp(0, nb2 - 1).to(torch.int64)
    mass2 = torch.zeros(r, nb2, dtype=torch.int64, device=dev).scatter_add_(
        -1, sub, torch.where(cross, fix, torch.zeros_like(fix)))
    cum2 = above[:, None] + torch.cumsum(mass2, -1)
    k2 = (cum2 < target[:, None]).sum(-1).clamp(max=nb2 - 1)
    keep = binned & ((b1 < k1[:, None]) | (cross & (sub <= k2[:, None])))
    return torch.where(finite[:, None], keep, live)


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
    """Keep, per KV head, the union of its query heads' binned nucleus sets (plus forced
    items); the contract of :func:`topp_select` (arguments as :func:`topp_nucleus`).

    Returns kept positions ``[B, Hkv, M]`` int64 (in candidate order, first ``kept_counts``
    live, 0 after them here; unspecified after them from the kernels) and
    ``kept_counts [B, Hkv]`` int64.
    """
    m = logits.shape[-1]
    live = torch.arange(m, device=logits.device) < counts[..., None]  # [B, Hkv, M]
    return _binned_select(logits, live, indices, p, forced, span, sink, window)


def _binned_select(logits: Tensor, live: Tensor, positions: Tensor, p: float,
                   forced: Tensor | None, span: KeySpan | None, sink: int,
                   window: int) -> tuple[Tensor, Tensor]:
    """The binned rule over slots: ``logits [B, Hq, M]`` and ``live``/``positions``
    ``[B, Hkv, M]``; the kept positions in slot order and their counts."""
    b, hq, m = logits.shape
    hkv = live.shape[1]
    if p >= 1.0:
        keep = live
    else:
        live_q = live.repeat_interleave(hq // hkv, dim=1)
        keep = binned_keep_reference(logits.reshape(b * hq, m), live_q.reshape(b * hq, m), p)
        keep = keep.view(b, hkv, hq // hkv, m).any(2)
    if forced is not None:
        keep = keep | (forced & live)
    if span is not None and (sink or window):
        keep = keep | (span.forced(positions, sink, window) & live)
    return compact(positions, keep)


# --- public entry points ------------------------------------------------------------------

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
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Binned nucleus selection per KV head over an index list of candidates.

    The contract is :func:`topp_select_reference`'s (see the module doc for what the
    binned rule guarantees). ``logits`` is ``[B, Hq, M]`` over ``indices [B, Hkv, M]``;
    Twilight's hot path passes the int4 kernel's :class:`Estimates` to
    :func:`topp_select_estimates` instead.

    Examples
    --------
    >>> logits = torch.tensor([[[4.0, 0.0, 3.9, -9.0]]])
    >>> idx, cnt = torch.tensor([[[10, 11, 12, 13]]]), torch.tensor([[4]])
    >>> kept, n = topp_select(logits, idx, cnt, 0.9)
    >>> kept[0, 0, : n[0, 0]].tolist()
    [10, 12]
    """
    b, hq, m = logits.shape
    if indices.shape[0] != b or indices.shape[2] != m or hq % indices.shape[1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, Hq, M] over indices "
                         f"[B, Hkv, M], got indices {tuple(indices.shape)}")
    _check_p(p)
    if forced is not None and forced.shape != indices.shape:
        raise ValueError(f"forced {tuple(forced.shape)} must have the shape of indices "
                         f"{tuple(indices.shape)}")
    if m == 0 or p >= 1.0 or not use_triton(impl, logits, indices):
        return topp_select_reference(logits, indices, counts, p, forced, span=span,
                                     sink=sink, window=window)
    span = span if span is not None else KeySpan.full(b, max(m, 1), logits.device)
    est = Estimates.from_logits(slot_major(logits, indices.shape[1]), span, indices, counts)
    return topp_binned.select(est, p, sink=sink, window=window, forced=forced)


def topp_select_range(
    logits: Tensor,
    span: KeySpan,
    num_kv_heads: int,
    p: float,
    *,
    sink: int = 0,
    window: int = 0,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Binned nucleus selection per KV head over every valid position (no index list).

    ``logits`` is ``[B, Hq, N]`` over cache positions (slot j is position j); positions
    outside ``span`` are not candidates whatever their logits. Returns kept positions
    ``[B, Hkv, N]`` (ascending, first ``counts`` live) and ``counts [B, Hkv]``.
    """
    b, hq, n = logits.shape
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide Hq={hq}")
    if span.n != n or span.starts.shape[0] != b:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, Hq, N] over the span's "
                         f"B={span.starts.shape[0]} sequences of N={span.n} positions")
    _check_p(p)
    est = Estimates.from_logits(slot_major(logits, num_kv_heads), span)
    return topp_select_estimates(est, p, sink=sink, window=window, impl=impl)


def topp_select_estimates(
    est: Estimates, p: float, *, sink: int = 0, window: int = 0, impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Binned nucleus selection over the candidates of :class:`Estimates` (the int4
    kernel's output, or any slot-major logits): kept positions ``[B, Hkv, M]`` (in
    candidate order, first ``counts`` live; unspecified after them on the Triton path) and
    ``counts [B, Hkv]`` int64. ``p`` in (0, 1]."""
    _check_p(p)
    m = est.values.shape[2]
    if m == 0 or p >= 1.0 or not use_triton(impl, est.values):
        return _binned_select(est.head_major(), est.live(), est.positions(), p, None,
                              est.span, sink, window)
    return topp_binned.select(est, p, sink=sink, window=window)


def _check_p(p: float) -> None:
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p={p} must be in (0, 1]; use p=1.0 to keep every candidate")
