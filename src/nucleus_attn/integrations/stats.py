"""Budget statistics of a model run: kept tokens and kept attention mass, per layer and head.

Every decode step of every layer adds its :class:`~nucleus_attn.DecodeInfo` here, at the
cost of one small device op per layer and step and no host sync: the step's kept counts
and lengths are written with one ``torch.cat(..., out=)`` into a ring of
:data:`RING_STEPS` slots, which is reduced into running sums (a few ops) once it is full.
Inside a CUDA-graph capture (whole-step graphs, ``torch.compile(mode="reduce-overhead")``)
the step is instead added in place to device sums, row count included, so that every
replay counts although replays run no Python. :meth:`LayerStats.as_dict` reads the sums
once when a summary is asked for.

Layers that run dense attention (the first ``dense_layers`` and sliding-window layers)
count as keeping every token (kept fraction 1) and all of the mass (mass 1): that is what
they attend to, and it keeps the model-wide averages honest about the cost of decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..decode import DecodeInfo

#: Why a layer runs dense attention, as reported in summaries.
KINDS = ("sparse", "dense", "sliding")
#: Decode steps a layer's ring holds before it is reduced into the running sums.
RING_STEPS = 64


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _fits(buf: Tensor | None, shape: tuple[int, ...], device: torch.device) -> bool:
    return buf is not None and tuple(buf.shape[1:]) == shape and buf.device == device


def _buffer(*shape: int, dtype: torch.dtype, device: torch.device, zero: bool = False) -> Tensor:
    """A buffer that steps inside and outside ``torch.inference_mode`` can both write into
    (made outside inference mode: an inference tensor cannot be written outside it)."""
    with torch.inference_mode(False):
        make = torch.zeros if zero else torch.empty
        return make(*shape, dtype=dtype, device=device)


@dataclass
class LayerStats:
    """Running sums of one attention layer's decode steps.

    Parameters
    ----------
    layer : int
        Layer index (``module.layer_idx``).
    kind : str
        ``"sparse"`` (runs the method), ``"dense"`` (one of the first dense layers, or any
        layer under the ``dense`` method) or ``"sliding"`` (a sliding-window layer, run
        dense to keep its window).
    q_heads, kv_heads : int
        Hq and Hkv of the layer.
    """

    layer: int
    kind: str
    q_heads: int
    kv_heads: int
    rows: int = 0  # decode steps x batch rows seen (host-side count, eager steps)
    # [4, Hkv] float64 sums over the folded rows of: kept fraction, its square, kept tokens,
    # valid tokens (made with the ring, added to in place)
    sums: Tensor | None = field(default=None, repr=False)
    mass: Tensor | None = field(default=None, repr=False)  # [Hq] float64 sum of kept masses
    mass_rows: int = 0
    # eager steps not yet reduced: [RING_STEPS, B, Hkv + 1] int64 (kept counts, then the
    # sequence length) and [RING_STEPS, B, Hq] float32 masses; `filled` slots are live
    _ring: Tensor | None = field(default=None, repr=False)
    _ring_mass: Tensor | None = field(default=None, repr=False)
    _filled: int = field(default=0, repr=False)
    _mass_filled: int = field(default=0, repr=False)
    # steps added inside CUDA-graph captures, by every replay: [5, Hkv] float32 (the four
    # sums, then rows) and [Hq + 1] float32 (mass sums, then rows). Zeroed when made, by an
    # eager step (a zero fill inside a capture would run again at every replay)
    _graph_sums: Tensor | None = field(default=None, repr=False)
    _graph_mass: Tensor | None = field(default=None, repr=False)
    missed_captures: int = 0  # captured steps that found no graph buffer (not counted)

    @property
    def dense(self) -> bool:
        """True when the layer attends to every token (not the method)."""
        return self.kind != "sparse"

    def reset(self) -> None:
        """Forget every step seen so far (buffers are zeroed in place: those captured in a
        CUDA graph keep counting the later replays)."""
        self.rows = self.mass_rows = 0
        self._filled = self._mass_filled = 0
        for t in (self.sums, self.mass, self._graph_sums, self._graph_mass):
            if t is not None:
                t.zero_()
        self.missed_captures = 0

    def add_dense(self, rows: int) -> None:
        """Count ``rows`` decode rows attended densely (nothing to read from the device)."""
        self.rows += rows

    def add(self, info: DecodeInfo) -> None:
        """Record one decode step (``info.kept [B, Hkv]``, ``info.lengths [B]``,
        ``info.mass [B, Hq]``): one device op, or an in-place update inside a CUDA-graph
        capture."""
        kept = info.kept
        b, hkv = kept.shape
        self.kv_heads = hkv  # the heads this process holds (all but under TP)
        if _capturing(kept):
            self._add_in_place(info)
            return
        hq = None if info.mass is None else info.mass.shape[1]
        self.prepare(b, hkv, hq, kept.device)
        torch.cat((kept, info.lengths[:, None]), 1, out=self._ring[self._filled])
        self._filled += 1
        self.rows += b
        if info.mass is not None:
            self.q_heads = hq
            self._ring_mass[self._mass_filled].copy_(info.mass)
            self._mass_filled += 1
            self.mass_rows += b
        if self._filled == RING_STEPS or self._mass_filled == RING_STEPS:
            self._fold()

    def prepare(self, b: int, hkv: int, hq: int | None, device: torch.device) -> None:
        """Make (if not there yet) the buffers a step of ``b`` rows, ``hkv`` KV heads and
        ``hq`` query heads (None: no masses measured) writes into. :meth:`add` calls it;
        compiled generation calls it at the prefill, outside any step, since a step under
        ``torch.compile(mode="reduce-overhead")`` may not allocate what outlives it."""
        if device.type == "cuda":  # ready for a later capture (zeroed here, outside it)
            if self._graph_sums is None or self._graph_sums.shape[1] != hkv:
                self._graph_sums = _buffer(5, hkv, dtype=torch.float32, device=device,
                                           zero=True)
            if hq is not None and (self._graph_mass is None
                                   or self._graph_mass.shape[0] != hq + 1):
                self._graph_mass = _buffer(hq + 1, dtype=torch.float32, device=device,
                                           zero=True)
        if not _fits(self._ring, (b, hkv + 1), device):
            self._fold()
            self._ring = _buffer(RING_STEPS, b, hkv + 1, dtype=torch.int64, device=device)
            if self.sums is None or self.sums.shape[1] != hkv:
                # made with the ring, so that the footprint does not change at the first fold
                self.sums = _buffer(4, hkv, dtype=torch.float64, device=device, zero=True)
        if hq is not None and not _fits(self._ring_mass, (b, hq), device):
            self._fold()
            self._ring_mass = _buffer(RING_STEPS, b, hq, dtype=torch.float32, device=device)
            if self.mass is None or self.mass.shape[0] != hq:
                self.mass = _buffer(hq, dtype=torch.float64, device=device, zero=True)

    def _fold(self) -> None:
        """Reduce the live ring slots into the running sums (a few ops, no host sync)."""
        if self._filled:
            ring = self._ring[:self._filled]
            hkv = ring.shape[-1] - 1
            kept = ring[..., :hkv].double()
            lengths = ring[..., hkv:].double().expand_as(kept)
            frac = kept / lengths
            self.sums.add_(torch.stack((frac, frac * frac, kept, lengths)).sum((1, 2)))
            self._filled = 0
        if self._mass_filled:
            self.mass.add_(self._ring_mass[:self._mass_filled].double().sum((0, 1)))
            self._mass_filled = 0

    def _add_in_place(self, info: DecodeInfo) -> None:
        """Add the step to the graph buffers in place (a few ops, replayed every step)."""
        kept = info.kept.float()
        b, hkv = kept.shape
        sums = self._graph_sums
        if sums is None or sums.shape[1] != hkv or (
                info.mass is not None and (self._graph_mass is None
                                           or self._graph_mass.shape[0] != info.mass.shape[1] + 1)):
            self.missed_captures += 1  # no eager step of this shape came first
            return
        lengths = info.lengths.float()[:, None].expand_as(kept)
        frac = kept / lengths
        sums.add_(torch.stack((frac, frac * frac, kept, lengths, torch.ones_like(frac))).sum(1))
        if info.mass is not None:
            self.q_heads = info.mass.shape[1]
            self._graph_mass.add_(torch.cat((info.mass.float().sum(0),
                                             torch.full_like(info.mass[0, :1], b))))

    def _totals(self) -> tuple[list[list[float]] | None, int, list[float] | None, int]:
        """Sums and rows over eager and captured steps (the one host sync of a summary)."""
        self._fold()
        rows, mass_rows = self.rows, self.mass_rows
        sums = None if self.sums is None or not rows else self.sums.tolist()
        mass = None if self.mass is None or not mass_rows else self.mass.tolist()
        if self._graph_sums is not None:
            g = self._graph_sums.double().tolist()
            graph_rows = round(g[4][0])
            if graph_rows:
                rows += graph_rows
                sums = g[:4] if sums is None else [
                    [a + c for a, c in zip(x, y, strict=True)]
                    for x, y in zip(sums, g[:4], strict=True)]
        if self._graph_mass is not None:
            gm = self._graph_mass.double().tolist()
            if round(gm[-1]):
                mass_rows += round(gm[-1])
                mass = gm[:-1] if mass is None else [a + c for a, c in
                                                      zip(mass, gm[:-1], strict=True)]
        return sums, rows, mass, mass_rows

    def as_dict(self) -> dict[str, Any]:
        """Means over the rows seen (None where nothing was measured); one host sync."""
        sums, rows, mass_sums, mass_rows = (None, self.rows, None, 0) if self.dense else \
            self._totals()
        out: dict[str, Any] = {"layer": self.layer, "dense": self.dense, "kind": self.kind,
                               "decode_rows": rows}
        if rows == 0:
            out.update(mean_kept_fraction=None, std_kept_fraction=None, mean_mass=None,
                       kept_fraction_per_head=None, mass_per_head=None,
                       mean_kept_tokens=None, mean_context_tokens=None)
            return out
        if self.dense or sums is None:
            ones_kv, ones_q = [1.0] * self.kv_heads, [1.0] * self.q_heads
            out.update(mean_kept_fraction=1.0, std_kept_fraction=0.0, mean_mass=1.0,
                       kept_fraction_per_head=ones_kv, mass_per_head=ones_q,
                       mean_kept_tokens=None, mean_context_tokens=None)
            return out
        sums = [[x / rows for x in row] for row in sums]  # [4][Hkv]
        per_head = sums[0]
        mean = sum(per_head) / len(per_head)
        mean_sq = sum(sums[1]) / len(per_head)
        mass = None if mass_sums is None else [x / mass_rows for x in mass_sums]
        out.update(
            mean_kept_fraction=mean,
            std_kept_fraction=math.sqrt(max(mean_sq - mean * mean, 0.0)),
            mean_mass=None if mass is None else sum(mass) / len(mass),
            kept_fraction_per_head=per_head,
            mass_per_head=mass,
            mean_kept_tokens=sum(sums[2]) / len(per_head),
            mean_context_tokens=sums[3][0],
        )
        return out


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def summarize(layers: list[LayerStats], header: dict[str, Any]) -> dict[str, Any]:
    """A model-wide summary: ``header`` plus means over layers and the ``per_layer`` list.

    ``mean_kept_fraction`` and ``mean_mass`` average every layer (dense layers as 1);
    ``sparse_kept_fraction`` and ``sparse_mass`` average the layers that run the method
    (None when there are none). ``std_kept_fraction`` is the spread over layers, heads,
    steps and rows. ``mean_mass`` is None unless diagnostics were on.
    """
    per_layer = [s.as_dict() for s in layers]
    seen = [d for d in per_layer if d["decode_rows"]]
    sparse = [d for d in seen if not d["dense"]]
    # pooled spread: E[x^2] - E[x]^2 over every (layer, head, row) sample
    n = sum(d["decode_rows"] * len(d["kept_fraction_per_head"]) for d in seen)
    if n:
        m1 = sum(d["decode_rows"] * d["mean_kept_fraction"] * len(d["kept_fraction_per_head"])
                 for d in seen) / n
        m2 = sum(d["decode_rows"] * len(d["kept_fraction_per_head"])
                 * (d["std_kept_fraction"] ** 2 + d["mean_kept_fraction"] ** 2)
                 for d in seen) / n
        std: float | None = math.sqrt(max(m2 - m1 * m1, 0.0))
    else:
        std = None
    return {
        **header,
        "decode_rows": max((d["decode_rows"] for d in per_layer), default=0),
        "mean_kept_fraction": _mean([d["mean_kept_fraction"] for d in seen]),
        "std_kept_fraction": std,
        "mean_mass": _mean([d["mean_mass"] for d in seen]),
        "sparse_kept_fraction": _mean([d["mean_kept_fraction"] for d in sparse]),
        "sparse_mass": _mean([d["mean_mass"] for d in sparse]),
        "mean_kept_tokens": _mean([d["mean_kept_tokens"] for d in sparse]),
        "mean_context_tokens": _mean([d["mean_context_tokens"] for d in sparse]),
        "per_layer": per_layer,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_budget(summary: dict[str, Any]) -> str:
    """One line: the method, the kept fraction (all layers and sparse ones) and the mass.

    Examples
    --------
    ``twilight:p=0.9  kept 6.1% of tokens (sparse layers 4.2%, 97 of 2301)  mass 0.981
    over 30 layers x 8 decode rows``
    """
    if not summary.get("decode_rows"):
        return f"{summary.get('spec', summary.get('method'))}: no decode step was run"
    parts = [f"{summary.get('spec', summary.get('method'))}  kept "
             f"{_pct(summary['mean_kept_fraction'])} of tokens"]
    if summary["sparse_kept_fraction"] is not None:
        extra = f"sparse layers {_pct(summary['sparse_kept_fraction'])}"
        if summary["mean_kept_tokens"] is not None:
            extra += (f", {summary['mean_kept_tokens']:.0f} of "
                      f"{summary['mean_context_tokens']:.0f}")
        parts.append(f"({extra})")
    mass = summary["mean_mass"]
    parts.append(f" mass {_num(mass)}" if mass is not None else " mass not measured "
                 "(diagnostics off)")
    parts.append(f" over {len(summary['per_layer'])} layers x {summary['decode_rows']} "
                 "decode rows")
    return " ".join(parts)


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """Print a summary as a rich table, one row per layer, then :func:`format_budget`.

    Parameters
    ----------
    summary : dict
        From :meth:`nucleus_attn.integrations.hf.SparseDecodeHandle.summary`.
    console : rich.console.Console, optional
        Where to print (default: a new console on stdout).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    # fits 80 columns (a terminal's or a pipe's default width) at 128k-token contexts: no
    # cell is cut; the caption says what the short headers mean
    table = Table(title=f"nucleus-attn budget per layer: {summary.get('spec', '')}",
                  box=box.SIMPLE_HEAD, caption="kept: mean kept fraction (std over heads "
                  "and steps); heads: lowest-highest KV head; tokens: kept/context per KV "
                  "head; mass: exact kept softmax mass (lowest query head)")
    for col in ("layer", "kind", "kept (std)", "heads", "tokens", "mass (min)"):
        table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
    for d in summary["per_layer"]:
        heads = d["kept_fraction_per_head"] or []
        masses = d["mass_per_head"] or []
        tokens = ("-" if d["mean_kept_tokens"] is None else
                  f"{d['mean_kept_tokens']:.0f}/{d['mean_context_tokens']:.0f}")
        table.add_row(
            str(d["layer"]), d["kind"],
            f"{_pct(d['mean_kept_fraction'])} ({_pct(d['std_kept_fraction'])})",
            f"{_pct(min(heads))}-{_pct(max(heads))}" if heads else "-", tokens,
            f"{_num(d['mean_mass'])} ({_num(min(masses))})" if masses else
            _num(d["mean_mass"]),
        )
    console.print(table)
    console.print(format_budget(summary))
