"""Quest: pages ranked by an upper bound of q.k from per-page key min/max, fixed page budget.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", 2024
(https://arxiv.org/abs/2406.10774). Also Twilight's default base selector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from .. import ops
from ..span import KeySpan
from .base import (
    Budget,
    MethodConfig,
    MethodSpec,
    Selection,
    check_budget,
    check_int,
    check_sink_window,
    grow,
    resolve_budget,
)


@dataclass(frozen=True)
class QuestConfig(MethodConfig):
    """Fixed token budget spent on the pages with the highest upper-bound score.

    Parameters
    ----------
    budget : int or float
        Tokens kept (int) or fraction of N (float); rounded up to whole pages. Default 1024.
    page_size : int
        Positions per page (default 16).
    sink, window : int
        Pages holding the first ``sink`` / last ``window`` tokens are always chosen (they
        count towards the budget). Defaults 4 and 64.
    """

    name: ClassVar[str] = "quest"
    budget: Budget = 1024
    page_size: int = 16
    sink: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        check_budget(self.name, "budget", self.budget)
        check_int(self.name, "page_size", self.page_size, 1)
        check_sink_window(self.name, self.sink, self.window)


@dataclass
class PageState:
    """Per-page key bounds of one layer, ``[B, Hkv, P, d]`` each (capacity grows)."""

    page_size: int
    kmin: Tensor
    kmax: Tensor
    n: int = 0  # tokens covered
    pages: int = field(init=False, default=0)

    @staticmethod
    def build(k: Tensor, span: KeySpan, page_size: int) -> PageState:
        kmin, kmax = ops.page_minmax(k, span, page_size)
        state = PageState(page_size, kmin, kmax, k.shape[2])
        state.pages = kmin.shape[2]
        return state

    def extend(self, k: Tensor, span: KeySpan) -> None:
        """Recompute the last partial page and add the new ones."""
        n = k.shape[2]
        if n <= self.n:
            return
        first = self.n // self.page_size
        kmin, kmax = ops.page_minmax(k, span, self.page_size, first)
        self.pages = first + kmin.shape[2]
        self.kmin = grow(self.kmin, self.pages)
        self.kmax = grow(self.kmax, self.pages)
        self.kmin[:, :, first:self.pages] = kmin
        self.kmax[:, :, first:self.pages] = kmax
        self.n = n

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        """Recompute the page of each sequence's newest key (static cache)."""
        kmin, kmax, page = ops.last_page_minmax(k, span, self.page_size)
        b, h, _, d = kmin.shape
        idx = page.view(b, 1, 1, 1).expand(b, h, 1, d)
        self.kmin.scatter_(2, idx, kmin)
        self.kmax.scatter_(2, idx, kmax)


def new_state(k: Tensor, span: KeySpan, cfg: QuestConfig) -> PageState:
    return PageState.build(k, span, cfg.page_size)


def select_pages(
    q: Tensor, pages: PageState, span: KeySpan, budget: int, sink: int, window: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Token positions of the best ``ceil(budget / page_size)`` pages per KV head.

    Pages are ranked by the group's maximum log-softmax of the scaled page bounds. Pages
    holding sink or window tokens (and the last page) are always chosen and count towards
    the budget; when they alone exceed it, only they are kept.
    """
    ps, hkv = pages.page_size, pages.kmin.shape[1]
    p = pages.pages
    kmin, kmax = pages.kmin[:, :, :p], pages.kmax[:, :, :p]
    k = math.ceil(budget / ps)
    if ops.topk_pages_uses_stats(p, q.shape[0], hkv, q.device):
        # the bounds' softmax statistics come out of the same pass, for the top-k kernel
        bounds, stats = ops.page_scores(q, kmin, kmax, span, ps, stats=True, scale=scale)
        return ops.topk_pages(bounds, hkv, span, ps, k, sink, max(window, 1), scale,
                              stats=stats)
    bounds = ops.page_scores(q, kmin, kmax, span, ps)
    return ops.topk_pages(bounds, hkv, span, ps, k, sink, max(window, 1), scale)


def select(q: Tensor, k: Tensor, state: PageState, span: KeySpan, cfg: QuestConfig,
           scale: float) -> Selection:
    """Keep every valid token of the chosen pages."""
    n, hkv = k.shape[2], k.shape[1]
    budget = resolve_budget(cfg.budget, n)
    if budget >= n:
        return Selection.everything(span, hkv)
    idx, cnt = select_pages(q, state, span, budget, cfg.sink, cfg.window, scale)
    return Selection(idx, cnt, cnt)


SPEC = MethodSpec("quest", QuestConfig, select, new_state)
