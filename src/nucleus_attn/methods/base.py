"""What every method shares: the selection result, config checks, budgets, sink and window.

A method is a frozen config dataclass plus a ``select`` function mapping
``(q, k, state, span, config, scale)`` to a :class:`Selection` (kept positions per KV
head), and optionally a ``new_state`` function building the per-sequence metadata it
reads (page bounds, int4 keys, clusters). The state is built from K once and then kept
up to date with ``state.extend(k, span)`` as tokens are appended (a growing cache) or
``state.refresh(k, span)`` (a static cache, where the newest key sits at ``span.ends - 1``);
the model integration keeps one per layer.

GQA rule, for every method: one selection per KV head, shared by its query heads. Where
a method ranks items, the group's per-head scores are turned into log-softmax values and
the group takes the maximum (:func:`nucleus_attn.ops.group_logsoftmax_max`); where it
keeps a mass p, the group keeps the union of each query head's nucleus set, so every
query head keeps at least p of its own (estimated) mass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..crossover import check_dense_below
from ..span import KeySpan

Budget = int | float


class MethodState(Protocol):
    """Per-sequence metadata of one layer, kept in step with the KV cache."""

    def extend(self, k: Tensor, span: KeySpan) -> None:
        """Take in the keys appended since the last call (``k`` is the whole cache)."""

    def refresh(self, k: Tensor, span: KeySpan) -> None:
        """Take in the key each sequence wrote at ``span.ends - 1`` of a static cache.

        A static (pre-allocated) cache keeps N fixed; the new token's position is a device
        value, so the update runs without a host sync and can be captured in a CUDA graph.
        """


@dataclass(frozen=True)
class Selection:
    """Which keys each KV head attends to in this decode step.

    Attributes
    ----------
    indices : Tensor or None
        ``[B, Hkv, M]`` int64 kept positions, the first ``counts`` live. None means
        every valid key (the step is computed as dense attention).
    counts : Tensor
        ``[B, Hkv]`` int64 kept tokens.
    candidates : Tensor
        ``[B, Hkv]`` int64 tokens the method's selector proposed before any pruning.
    """

    indices: Tensor | None
    counts: Tensor
    candidates: Tensor

    @staticmethod
    def everything(span: KeySpan, num_kv_heads: int) -> Selection:
        n = span.lengths[:, None].expand(-1, num_kv_heads)
        return Selection(None, n, n)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: a registered ``name``, the crossover length and
    validation helpers.

    Parameters
    ----------
    dense_below : int or None
        Keyword-only, on every method. Decode steps with a cache of fewer tokens run dense
        attention (selection has a fixed cost, so below some length dense is faster).
        None (default): the measured crossover of this GPU and method
        (:data:`nucleus_attn.crossover.DENSE_BELOW`), not applied in diagnostics mode;
        0: never; n: below n tokens. See :mod:`nucleus_attn.crossover`.
    """

    name: ClassVar[str] = ""
    dense_below: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        check_dense_below(self.name, self.dense_below)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a method's own __post_init__ (its field checks) also checks the shared fields
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_shared", False):
            return

        def post_init(self: MethodConfig) -> None:
            check_dense_below(self.name, self.dense_below)
            own(self)

        post_init._checks_shared = True  # type: ignore[attr-defined]
        cls.__post_init__ = post_init  # type: ignore[method-assign]

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: the name, its config class and the functions that run it."""

    name: str
    config: type[MethodConfig]
    select: Callable[..., Selection]
    new_state: Callable[[Tensor, KeySpan, Any], MethodState] | None = None


# --- config checks (ValueError naming the field, the value and the fix) -----------------

def check_p(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(
            f"{name}: p={p!r} must be a number in (0, 1]; it is the attention mass to keep "
            "(use p=1.0 for dense attention)"
        )


def check_budget(name: str, field: str, budget: Budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"{name}: {field}={budget!r} must be an int (tokens) or a float "
                        "(fraction of N)")
    if isinstance(budget, int) and budget <= 0:
        raise ValueError(f"{name}: {field}={budget} tokens must be >= 1")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(
            f"{name}: {field}={budget} as a float is a fraction of the context and must be "
            f"in (0, 1]; pass an int for a number of tokens (e.g. {field}={max(1, int(budget))})"
        )


def check_int(name: str, field: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {field}={value!r} must be an int >= {minimum}")


def check_sink_window(name: str, sink: int, window: int) -> None:
    check_int(name, "sink", sink, 0)
    check_int(name, "window", window, 0)


def resolve_budget(budget: Budget, n: int) -> int:
    """Tokens for a budget given as tokens (int) or as a fraction of ``n`` (float).

    ``n`` is the cache length N, so in a left-padded batch a fraction is of the padded
    length: a static number, which keeps the step free of host syncs.
    """
    if isinstance(budget, float):
        return max(1, math.ceil(budget * n))
    return int(budget)


# --- shared selection pieces -------------------------------------------------------------

def forced_positions(span: KeySpan, num_kv_heads: int, sink: int, window: int) -> Tensor:
    """``[B, Hkv, N]`` bool: the sink and the recent window of each sequence."""
    pos = span.positions().expand(span.starts.shape[0], -1)
    return span.forced(pos, sink, window)[:, None, :].expand(-1, num_kv_heads, -1)


def sink_window_positions(span: KeySpan, n: int, sink: int, window: int,
                          since: Tensor | None = None, after: int = 0) -> tuple[Tensor, Tensor]:
    """The sink and the recent window of each sequence as positions, without a pass over N.

    Returns ``[B, F]`` positions, ascending, the first ``count [B]`` live (the rest 0). With
    ``since`` (``[B]``), every position from ``since`` on also counts as recent (Tactic's
    tokens appended after clustering, at most ``after`` of them per sequence).
    """
    s, e = span.starts, span.ends
    # the window (and the tokens since `since`) are [a, e); the sink is [s, s + sink)
    recent = e - window if since is None else torch.minimum(e - window, since)
    a = torch.maximum(s, recent)
    n_sink = (torch.minimum(s + sink, a) - s).clamp(min=0)
    count = n_sink + (e - a)
    f = max(1, min(n, sink + max(window, after)))
    j = torch.arange(f, device=s.device)[None, :]
    pos = torch.where(j < n_sink[:, None], s[:, None] + j, a[:, None] + j - n_sink[:, None])
    return torch.where(j < count[:, None], pos, torch.zeros_like(pos)), count


def valid_positions(span: KeySpan, num_kv_heads: int) -> Tensor:
    """``[B, Hkv, N]`` bool: the valid keys, broadcast over KV heads."""
    return span.valid_mask()[:, None, :].expand(-1, num_kv_heads, -1)


def grow(buf: Tensor, size: int, dim: int = 2) -> Tensor:
    """``buf`` with room for ``size`` entries along ``dim`` (capacity doubles, data kept)."""
    cap = buf.shape[dim]
    if size <= cap:
        return buf
    shape = list(buf.shape)
    shape[dim] = max(size, 2 * cap)
    out = torch.zeros(shape, dtype=buf.dtype, device=buf.device)
    out.narrow(dim, 0, cap).copy_(buf)
    return out


def last_index(span: KeySpan, heads: int, *trailing: int) -> Tensor:
    """``[B, heads, 1, *trailing]`` position of each sequence's newest key (``ends - 1``),
    to ``gather``/``scatter_`` along dim 2 of a ``[B, Hkv, N, ...]`` buffer."""
    b = span.ends.shape[0]
    last = (span.ends - 1).view(b, 1, 1, *([1] * len(trailing)))
    return last.expand(b, heads, 1, *trailing)
