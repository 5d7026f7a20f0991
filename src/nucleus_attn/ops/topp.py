"""Top-p (nucleus) selection: the smallest set of candidates whose softmax mass reaches p.

The threshold is found by bisection, not by sorting: with non-negative weights
``w_i = exp(l_i - max l)``, the kept set for a threshold t is ``{i : w_i >= t}`` and its
mass only shrinks as t grows, so the largest t whose mass still reaches ``p * sum(w)`` is
found by halving an interval. Bisecting over the *bit patterns* of float32 (which order
like the values for non-negative floats) ends on an exact weight after at most 31 steps,
so the result equals the sort-based definition, ties at the threshold aside (all tied
weights are kept). Each step is one masked sum per row: no sort, no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import use_triton
from .select import compact

BISECT_STEPS = 32  # bit patterns of weights in [0, 1] span < 2**31 values


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
        ``[B, Hkv, M]`` bool candidates kept regardless (sink and recent window).

    Returns
    -------
    kept : Tensor
        ``[B, Hkv, M]`` int64 kept positions (ascending in candidate order), first
        ``kept_counts`` live.
    kept_counts : Tensor
        ``[B, Hkv]`` int64.
    """
    b, hq, m = logits.shape
    hkv = indices.shape[1]
    live = torch.arange(m, device=logits.device) < counts[..., None]  # [B, Hkv, M]
    live_q = live.repeat_interleave(hq // hkv, dim=1)
    w = topp_weights(torch.where(live_q, logits.float(), float("-inf")))
    t = topp_threshold_reference(w.view(b * hq, m), p).view(b, hq, 1)
    keep = ((w >= t) & live_q).view(b, hkv, hq // hkv, m).any(2)
    if forced is not None:
        keep |= forced & live
    return compact(indices, keep)


def topp_select(
    logits: Tensor,
    indices: Tensor,
    counts: Tensor,
    p: float,
    forced: Tensor | None = None,
    *,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Nucleus selection per KV head; see :func:`topp_select_reference` for the contract."""
    use_triton(impl, logits)
    return topp_select_reference(logits, indices, counts, p, forced)
