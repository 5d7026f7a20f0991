"""Oracle top-k and top-p: selection over the exact scores of every key.

They read every key to choose, so they save nothing; they are the upper bound of what a
selector with a given budget (top-k) or mass target (top-p) can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import ops
from ..span import KeySpan
from .base import (
    Budget,
    MethodConfig,
    MethodSpec,
    Selection,
    check_budget,
    check_p,
    check_sink_window,
    forced_positions,
    resolve_budget,
    valid_positions,
)


def exact_logits(q: Tensor, k: Tensor, span: KeySpan, scale: float) -> Tensor:
    """``[B, Hq, N]`` float32 ``scale * q . k`` over all positions, ``-inf`` for padding."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    s = torch.einsum("bhgd,bhnd->bhgn", q.float().view(b, hkv, hq // hkv, d), k.float()) * scale
    s = s.reshape(b, hq, -1)
    return torch.where(span.valid_mask()[:, None, :], s, torch.full_like(s, float("-inf")))


@dataclass(frozen=True)
class OracleTopKConfig(MethodConfig):
    """The ``budget`` keys of highest exact weight per KV head.

    Parameters
    ----------
    budget : int or float
        Tokens kept (int) or fraction of N (float); default 1024.
    sink, window : int
        Tokens always kept at the start / end (default 0: a pure oracle). They count
        towards the budget.
    """

    name: ClassVar[str] = "oracle-topk"
    budget: Budget = 1024
    sink: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        check_budget(self.name, "budget", self.budget)
        check_sink_window(self.name, self.sink, self.window)


def select_topk(q: Tensor, k: Tensor, state: None, span: KeySpan, cfg: OracleTopKConfig,
                scale: float) -> Selection:
    """Rank keys by the group's maximum exact log-softmax weight; keep the best ``budget``."""
    n, hkv = k.shape[2], k.shape[1]
    budget = resolve_budget(cfg.budget, n)
    if budget >= n:
        return Selection.everything(span, hkv)
    agg = ops.group_logsoftmax_max(exact_logits(q, k, span, scale), hkv)
    keep = ops.keep_best(agg, budget, forced_positions(span, hkv, cfg.sink, cfg.window))
    idx, cnt = ops.mask_to_indices(keep, capacity=max(budget, cfg.sink + cfg.window))
    return Selection(idx, cnt, span.lengths[:, None].expand(-1, hkv))


@dataclass(frozen=True)
class OracleTopPConfig(MethodConfig):
    """The smallest set of keys whose exact softmax mass reaches ``p``, per query head.

    Parameters
    ----------
    p : float
        Mass to keep, in (0, 1] (default 0.9, as Twilight and Tactic: the oracle is the
        bound those methods are compared against at the same ``p``). Per KV head the
        union of its query heads' sets is kept.
    sink, window : int
        Tokens always kept at the start / end (default 0: a pure oracle).
    """

    name: ClassVar[str] = "oracle-topp"
    p: float = 0.9
    sink: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        check_p(self.name, self.p)
        check_sink_window(self.name, self.sink, self.window)


def select_topp(q: Tensor, k: Tensor, state: None, span: KeySpan, cfg: OracleTopPConfig,
                scale: float) -> Selection:
    """Nucleus of the exact weights over all valid keys."""
    b, hq, _ = q.shape
    hkv = k.shape[1]
    if cfg.p >= 1.0:
        return Selection.everything(span, hkv)
    idx, cnt = ops.mask_to_indices(valid_positions(span, hkv))
    logits = exact_logits(q, k, span, scale).gather(-1, idx.repeat_interleave(hq // hkv, dim=1))
    forced = span.forced(idx, cfg.sink, cfg.window) if cfg.sink or cfg.window else None
    kept, kcnt = ops.topp_nucleus(logits, idx, cnt, cfg.p, forced)
    return Selection(kept, kcnt, cnt)


TOPK = MethodSpec("oracle-topk", OracleTopKConfig, select_topk)
TOPP = MethodSpec("oracle-topp", OracleTopPConfig, select_topp)
