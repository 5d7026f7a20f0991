"""StreamingLLM: the attention sink plus a recent window, nothing else.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023
(https://arxiv.org/abs/2309.17453).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..span import KeySpan
from .base import (
    Budget,
    MethodConfig,
    MethodSpec,
    Selection,
    check_budget,
    check_int,
    resolve_budget,
    sink_window_positions,
)


@dataclass(frozen=True)
class StreamingConfig(MethodConfig):
    """Sink + recent window.

    Parameters
    ----------
    sink : int
        First tokens always kept (default 4).
    window : int or float
        Most recent tokens kept, as tokens (int) or a fraction of N (float); default 1020,
        so that sink + window = 1024.
    """

    name: ClassVar[str] = "streaming"
    sink: int = 4
    window: Budget = 1020

    def __post_init__(self) -> None:
        check_int(self.name, "sink", self.sink, 0)
        check_budget(self.name, "window", self.window)


def select(q: Tensor, k: Tensor, state: None, span: KeySpan, cfg: StreamingConfig,
           scale: float) -> Selection:
    """Keep the sink and the window of each sequence."""
    n, hkv = k.shape[2], k.shape[1]
    window = resolve_budget(cfg.window, n)
    if cfg.sink + window >= n:
        return Selection.everything(span, hkv)
    # two ranges per sequence, written directly (no pass over the N positions)
    idx, cnt = sink_window_positions(span, n, cfg.sink, window)
    b = idx.shape[0]
    idx = idx[:, None, :].expand(b, hkv, -1)
    cnt = cnt[:, None].expand(b, hkv)
    return Selection(idx, cnt, cnt)


SPEC = MethodSpec("streaming", StreamingConfig, select)
