"""Small index utilities shared by every selector: compaction, GQA aggregation, top-k.

Selections are index lists per KV head, ``indices[B, Hkv, M]`` with ``counts[B, Hkv]``
valid entries first (ascending positions) and arbitrary padding after them, so that a
paged backend can consume them unchanged. These helpers are plain torch on purpose: they
move a few bytes per token (no key reads) and never synchronise with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact(values: Tensor, keep: Tensor, capacity: int | None = None) -> tuple[Tensor, Tensor]:
    """Move the kept entries of each row to its front, in order, without a host sync.

    Parameters
    ----------
    values : Tensor
        ``[..., X]`` int64 (typically token positions).
    keep : Tensor
        ``[..., X]`` bool, which entries to keep.
    capacity : int, optional
        Width of the output (default X). Kept entries past it are dropped.

    Returns
    -------
    out : Tensor
        ``[..., capacity]`` int64; the first ``count`` entries are the kept values, the
        rest are 0 (a valid position, so that unguarded gathers stay in bounds).
    count : Tensor
        ``[...]`` int64 number of kept entries (clipped to ``capacity``).
    """
    x = values.shape[-1]
    cap = x if capacity is None else capacity
    slot = torch.cumsum(keep, dim=-1) - 1
    slot = torch.where(keep & (slot < cap), slot, torch.full_like(slot, cap))
    out = torch.zeros(*values.shape[:-1], cap + 1, dtype=torch.int64, device=values.device)
    out.scatter_(-1, slot, values.to(torch.int64))
    count = keep.sum(-1).clamp(max=cap)
    return out[..., :cap], count


def mask_to_indices(mask: Tensor, capacity: int | None = None) -> tuple[Tensor, Tensor]:
    """Positions of the True entries of ``mask[..., N]``, ascending, with their count."""
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return compact(pos, mask, capacity)


def indices_to_mask(indices: Tensor, counts: Tensor, n: int) -> Tensor:
    """``[..., N]`` bool mask of the first ``counts`` entries of ``indices[..., M]``."""
    m = indices.shape[-1]
    live = torch.arange(m, device=indices.device) < counts[..., None]
    mask = torch.zeros(*indices.shape[:-1], n + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(live, indices, torch.full_like(indices, n)), True)
    return mask[..., :n]


def group_logsoftmax_max(scores: Tensor, num_kv_heads: int) -> Tensor:
    """Aggregate per-query-head scores into one ranking per KV head.

    Each query head's scores ``[B, Hq, X]`` are turned into log-probabilities (log-softmax
    over X, so heads with large query norms do not dominate), then the group of query
    heads sharing a KV head takes the maximum: an item ranks high if any head of the group
    would attend to it. ``-inf`` entries (padding) stay ``-inf``.

    Returns ``[B, Hkv, X]`` float32.
    """
    b, hq, x = scores.shape
    s = scores.float()
    finite_row = torch.isfinite(s).any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(finite_row, s, torch.zeros_like(s)), -1, keepdim=True)
    logp = torch.where(finite_row, s - lse, torch.full_like(s, float("-inf")))
    return logp.view(b, num_kv_heads, hq // num_kv_heads, x).amax(2)


def keep_best(agg: Tensor, budget: int, forced: Tensor) -> Tensor:
    """Forced items plus the best others, ``budget`` items in all (or just the forced ones).

    ``agg`` is ``[..., X]`` (``-inf`` for items that do not exist), ``forced`` a bool mask
    of the same shape. Returns the kept items as a bool mask. Forced items never compete
    for places, so which items are kept does not depend on ties among them.
    """
    k = min(budget, agg.shape[-1])
    others = agg.masked_fill(forced, float("-inf"))
    top = torch.topk(others, k, dim=-1, sorted=True)
    room = k - forced.sum(-1, keepdim=True)  # places left after the forced items
    take = (torch.arange(k, device=agg.device) < room) & torch.isfinite(top.values)
    return forced | torch.zeros_like(forced).scatter_(-1, top.indices, take)
