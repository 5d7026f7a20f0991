"""Twilight: a base selector proposes generously, then top-p on 4-bit estimated weights prunes.

Lin et al., "Twilight: Adaptive Attention Sparsity with Hierarchical Top-p Pruning", 2025
(https://arxiv.org/abs/2502.02770). Select-then-prune: (1) the base selector (Quest pages
by default) proposes ``base_budget`` candidates; (2) their logits are estimated from
4-bit keys (a quarter of the key bytes); (3) each query head keeps the smallest set of
candidates whose estimated softmax mass reaches ``p`` (the KV head keeps the union);
(4) exact attention runs over the kept set. The budget adapts per head, layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    check_p,
    check_sink_window,
    grow,
    last_index,
    resolve_budget,
)
from .quest import PageState, select_pages

BASES = ("quest", "dense")


@dataclass(frozen=True)
class TwilightConfig(MethodConfig):
    """Hierarchical top-p pruning.

    Parameters
    ----------
    p : float
        Estimated attention mass each query head keeps, in (0, 1] (default 0.95);
        ``p=1`` is dense attention.
    base : str
        Candidate selector: ``"quest"`` (pages by upper bound, default) or ``"dense"``
        (every key is a candidate; the pruner alone decides).
    base_budget : int or float
        Candidates proposed by the base selector, tokens (int) or fraction of N (float);
        default 0.25.
    page_size : int
        Quest page size (default 16).
    sink, window : int
        Tokens always kept at the start / end of each sequence (default 4 / 64).
    """

    name: ClassVar[str] = "twilight"
    p: float = 0.95
    base: str = "quest"
    base_budget: Budget = 0.25
    page_size: int = 16
    sink: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        check_p(self.name, self.p)
        if self.base not in BASES:
            raise ValueError(f"twilight: base={self.base!r} is not one of {BASES}")
        check_budget(self.name, "base_budget", self.base_budget)
        check_int(self.name, "page_size", self.page_size, 1)
        check_sink_window(self.name, self.sink, self.window)


@dataclass
class Int4Keys:
    """4-bit copies of one layer's keys: codes ``[B, Hkv, N, d/2]``, scale/zero ``[B, Hkv, N]``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    n: int

    @staticmethod
    def build(k: Tensor) -> Int4Keys:
        return Int4Keys(*ops.quantize_int4(k), k.shape[2])

    def extend(self, k: Tensor, span: KeySpan) -> None:
        n = k.shape[2]
        if n <= self.n:
            return
        codes, scale, zero = ops.quantize_int4(k[:, :, self.n:])
        self.codes = grow(self.codes, n)
        self.scale = grow(self.scale, n)
        self.zero = grow(self.zero, n)
        self.codes[:, :, self.n:n] = codes
        self.scale[:, :, self.n:n] = scale
        self.zero[:, :, self.n:n] = zero
        self.n = n

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        """Quantize each sequence's newest key in place (static cache)."""
        b, h, _, d = k.shape
        codes, scale, zero = ops.quantize_int4(k.gather(2, last_index(span, h, d)))
        self.codes.scatter_(2, last_index(span, h, codes.shape[-1]), codes)
        self.scale.scatter_(2, last_index(span, h), scale)
        self.zero.scatter_(2, last_index(span, h), zero)


@dataclass
class TwilightState:
    """The base selector's page bounds (None for ``base="dense"``) and the 4-bit keys."""

    pages: PageState | None
    keys: Int4Keys

    def extend(self, k: Tensor, span: KeySpan) -> None:
        if self.pages is not None:
            self.pages.extend(k, span)
        self.keys.extend(k, span)

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        if self.pages is not None:
            self.pages.refresh(k, span)
        self.keys.refresh(k, span)


def new_state(k: Tensor, span: KeySpan, cfg: TwilightConfig) -> TwilightState:
    pages = PageState.build(k, span, cfg.page_size) if cfg.base == "quest" else None
    return TwilightState(pages, Int4Keys.build(k))


def select(q: Tensor, k: Tensor, state: TwilightState, span: KeySpan, cfg: TwilightConfig,
           scale: float) -> Selection:
    """Base candidates, then the union of per-head nucleus sets over estimated weights."""
    n, hkv = k.shape[2], k.shape[1]
    if cfg.p >= 1.0:
        return Selection.everything(span, hkv)
    budget = resolve_budget(cfg.base_budget, n)
    keys = state.keys
    if state.pages is None or budget >= n:  # every valid key is a candidate: no index list
        est, stats = ops.int4_scores_range(q, keys.codes, keys.scale, keys.zero, span, scale,
                                           stats=True)
        kept, kcnt = ops.topp_select_range(est, span, hkv, cfg.p, sink=cfg.sink,
                                           window=cfg.window, stats=stats)
        return Selection(kept, kcnt, span.lengths[:, None].expand(-1, hkv))
    cand, ccnt = select_pages(q, state.pages, span, budget, cfg.sink, cfg.window, scale)
    est, stats = ops.int4_scores(q, keys.codes, keys.scale, keys.zero, cand, ccnt, scale,
                                 stats=True)
    kept, kcnt = ops.topp_select(est, cand, ccnt, cfg.p, span=span, sink=cfg.sink,
                                 window=cfg.window, stats=stats)
    return Selection(kept, kcnt, ccnt)


SPEC = MethodSpec("twilight", TwilightConfig, select, new_state)
