"""Budget statistics of a model run: kept tokens and kept attention mass, per layer and head.

Every decode step of every layer adds its :class:`~nucleus_attn.DecodeInfo` here. Sums stay
on the device (a few tiny tensor ops per layer and step, no host sync); :meth:`LayerStats.as_dict`
reads them once when a summary is asked for.

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
    rows: int = 0  # decode steps x batch rows seen
    # [4, Hkv] sums over rows of: kept fraction, its square, kept tokens, valid tokens
    sums: Tensor | None = field(default=None, repr=False)
    mass: Tensor | None = field(default=None, repr=False)  # [Hq] sum of kept masses
    mass_rows: int = 0

    @property
    def dense(self) -> bool:
        """True when the layer attends to every token (not the method)."""
        return self.kind != "sparse"

    def reset(self) -> None:
        """Forget every step seen so far."""
        self.rows = self.mass_rows = 0
        self.sums = self.mass = None

    def add_dense(self, rows: int) -> None:
        """Count ``rows`` decode rows attended densely (nothing to read from the device)."""
        self.rows += rows

    def add(self, info: DecodeInfo) -> None:
        """Accumulate one decode step (``info.kept [B, Hkv]``, ``info.mass [B, Hq]``).

        Out-of-place sums, so that steps run inside and outside ``torch.inference_mode``
        can follow each other.
        """
        kept = info.kept.float()
        lengths = info.lengths.float()[:, None].expand_as(kept)
        frac = kept / lengths
        step = torch.stack((frac, frac * frac, kept, lengths)).sum(1)
        self.sums = step if self.sums is None else self.sums + step
        self.kv_heads = kept.shape[1]  # the heads this process holds (all but under TP)
        self.rows += kept.shape[0]
        if info.mass is not None:
            m = info.mass.float().sum(0)
            self.mass = m if self.mass is None else self.mass + m
            self.q_heads = m.shape[0]
            self.mass_rows += kept.shape[0]

    def as_dict(self) -> dict[str, Any]:
        """Means over the rows seen (None where nothing was measured); one host sync."""
        out: dict[str, Any] = {"layer": self.layer, "dense": self.dense, "kind": self.kind,
                               "decode_rows": self.rows}
        if self.rows == 0:
            out.update(mean_kept_fraction=None, std_kept_fraction=None, mean_mass=None,
                       kept_fraction_per_head=None, mass_per_head=None,
                       mean_kept_tokens=None, mean_context_tokens=None)
            return out
        if self.dense or self.sums is None:
            ones_kv, ones_q = [1.0] * self.kv_heads, [1.0] * self.q_heads
            out.update(mean_kept_fraction=1.0, std_kept_fraction=0.0, mean_mass=1.0,
                       kept_fraction_per_head=ones_kv, mass_per_head=ones_q,
                       mean_kept_tokens=None, mean_context_tokens=None)
            return out
        sums = (self.sums / self.rows).tolist()  # [4][Hkv]
        per_head = sums[0]
        mean = sum(per_head) / len(per_head)
        mean_sq = sum(sums[1]) / len(per_head)
        mass = None if self.mass is None else (self.mass / self.mass_rows).tolist()
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
    ``twilight:p=0.95  kept 6.1% of tokens (sparse layers 4.2%, 97 of 2301)  mass 0.981
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
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"nucleus-attn budget per layer: {summary.get('spec', '')}")
    for col in ("layer", "kind", "kept", "spread", "min head", "max head", "kept tokens",
                "mass", "min head mass"):
        table.add_column(col, justify="right" if col not in ("kind",) else "left")
    for d in summary["per_layer"]:
        heads = d["kept_fraction_per_head"] or []
        masses = d["mass_per_head"] or []
        tokens = ("-" if d["mean_kept_tokens"] is None else
                  f"{d['mean_kept_tokens']:.0f}/{d['mean_context_tokens']:.0f}")
        table.add_row(
            str(d["layer"]), d["kind"], _pct(d["mean_kept_fraction"]),
            _pct(d["std_kept_fraction"]), _pct(min(heads)) if heads else "-",
            _pct(max(heads)) if heads else "-", tokens, _num(d["mean_mass"]),
            _num(min(masses)) if masses else "-",
        )
    console.print(table)
    console.print(format_budget(summary))
