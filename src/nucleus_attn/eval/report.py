"""Eval rows to a markdown table and PNG plots.

A row is one (task or perplexity, context length, method setting) cell of a sweep, with the
budget that bought its accuracy: mean and spread of the kept fraction over layers and
heads, and the exact attention mass kept (diagnostics mode). Rows are plain dicts, read
from and written to JSON lines by :mod:`nucleus_attn.eval.store`.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def label(row: Row) -> str:
    """The row's method setting as ``name:knob=value,...`` (budget knob always shown).

    Built from the parameters the row recorded, against today's defaults, so a label stays
    true when a default changes (a Twilight row run on the Quest base when it was the
    default reads ``base=quest``). A parameter added after the row was written is not in
    it; :func:`unrecorded` lists those for the report.
    """
    from ..methods import describe, make_config

    params = {k: tuple(v) if isinstance(v, list) else v for k, v in row["params"].items()}
    return describe(make_config(row["name"], **params))


def unrecorded(rows: list[Row]) -> dict[str, list[str]]:
    """Per method, the parameters that some rows do not record (they were added after those
    rows ran; their labels show nothing for them). ``dense_below`` is left out: eval runs
    in diagnostics mode, where the crossover does not apply."""
    from ..methods import get_spec, parameter_names

    out: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("kind") in ("task", "perplexity"):
            fields = parameter_names(get_spec(r["name"]).config)
            out[r["name"]].update(f for f in fields if f not in r["params"]
                                  and f != "dense_below")
    return {name: sorted(fields) for name, fields in out.items() if fields}


def task_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.get("kind") == "task"]


def dropped_cells(rows: list[Row]) -> set[tuple[str, int]]:
    """(task, length) cells not swept because dense scored under the threshold."""
    return {(r["task"], r["length"]) for r in rows if r.get("kind") == "dropped"}


def swept_rows(rows: list[Row]) -> list[Row]:
    """Task rows of the swept cells only (dense included), so that means compare alike."""
    dropped = dropped_cells(rows)
    return [r for r in task_rows(rows) if (r["task"], r["length"]) not in dropped]


def summarize(rows: list[Row]) -> list[Row]:
    """One row per (length, method) over the swept tasks: mean accuracy, mean budget."""
    groups: dict[tuple[int, str], list[Row]] = defaultdict(list)
    for r in swept_rows(rows):
        groups[(r["length"], label(r))].append(r)
    out = []
    for (length, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _order(kv[1]))):
        out.append({
            "length": length,
            "method": method,
            "name": rs[0]["name"],
            "tasks": {r["task"]: r["accuracy"] for r in rs},
            "accuracy": _mean(r["accuracy"] for r in rs),
            "kept_fraction": _mean(r["kept_fraction"] for r in rs),
            "kept_fraction_std": _mean(r["kept_fraction_std"] for r in rs),
            "mass": _mean(r["mass"] for r in rs),
            "mass_min": min(r["mass_min"] for r in rs),
            "samples": sum(r["samples"] for r in rs),
        })
    return out


def _order(rs: list[Row]) -> tuple[int, float]:
    """Dense first, then methods in registry order, then by kept fraction."""
    from ..methods import methods

    names = methods()
    name = rs[0]["name"]
    return (names.index(name) if name in names else len(names), _mean(r["kept_fraction"]
                                                                      for r in rs))


def dense_markdown(rows: list[Row]) -> list[str]:
    """Dense accuracy per task and length, every cell (swept or not)."""
    dense = [r for r in task_rows(rows) if r["name"] == "dense"]
    if not dense:
        return []
    tasks = sorted({r["task"] for r in dense})
    lengths = sorted({r["length"] for r in dense})
    acc = {(r["task"], r["length"]): r["accuracy"] for r in dense}
    dropped = dropped_cells(rows)
    lines = ["### dense accuracy per task and length (* = not swept: dense too low)", "",
             "| task | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for t in tasks:
        cells = [f"{100 * acc[t, n]:.0f}{'*' if (t, n) in dropped else ''}"
                 if (t, n) in acc else "" for n in lengths]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(rows: list[Row]) -> str:
    """Dense accuracy first; then per length, the sweep over the swept tasks."""
    lines: list[str] = dense_markdown(rows)
    summary = summarize(rows)
    for length in sorted({s["length"] for s in summary}):
        tasks = sorted({t for s in summary if s["length"] == length for t in s["tasks"]})
        lines += [f"### {length} tokens (mean over the swept tasks)", ""]
        head = ["method", *tasks, "mean acc.", "kept % (std over heads)", "mass kept (min)", "n"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in (s for s in summary if s["length"] == length):
            cells = [s["method"]]
            cells += [f"{100 * s['tasks'][t]:.0f}" if t in s["tasks"] else "" for t in tasks]
            cells += [f"{100 * s['accuracy']:.1f}",
                      f"{100 * s['kept_fraction']:.2f} ({100 * s['kept_fraction_std']:.2f})",
                      f"{s['mass']:.4f} ({s['mass_min']:.3f})", str(s["samples"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    ppl = [r for r in rows if r.get("kind") == "perplexity"]
    if ppl:
        lines += ["### perplexity", "",
                  "| prefix | method | ppl | kept % (std) | mass kept (min) | tokens |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(ppl, key=lambda r: (r["length"], _order([r]))):
            lines.append(f"| {r['length']} | {label(r)} | {r['ppl']:.3f} | "
                         f"{100 * r['kept_fraction']:.2f} ({100 * r['kept_fraction_std']:.2f}) | "
                         f"{r['mass']:.4f} ({r['mass_min']:.3f}) | {r['tokens']} |")
        lines.append("")
    return "\n".join(lines)


SWEPT_KNOBS = ("p", "budget", "window")


def curve_label(method: str) -> str:
    """``twilight:p=0.9,base_budget=0.5`` -> ``twilight (base_budget=0.5)``: one curve per
    method and fixed parameters, along the knob that sets the budget."""
    name, _, rest = method.partition(":")
    fixed = [kv for kv in rest.split(",") if kv and kv.split("=")[0] not in SWEPT_KNOBS]
    return name + (f" ({', '.join(fixed)})" if fixed else "")


def log_limits(values: Iterable[float]) -> tuple[float, float]:
    """Limits of a log axis over ``values`` (> 0), widened to the nearest 1-2-5 steps so
    that the axis holds at least two labelled ticks, even when the values span less than a
    decade (a log axis labels only powers of ten by default: one label, or none)."""
    steps = (1.0, 2.0, 5.0, 10.0)
    vs = [v for v in values if v > 0]
    if not vs:
        return 1.0, 10.0
    lo, hi = min(vs) / 1.06, max(vs) * 1.06
    e = math.floor(math.log10(lo))
    below = max(s * 10**e for s in steps if s * 10**e <= lo * (1 + 1e-9))
    e = math.floor(math.log10(hi))
    above = min(s * 10**e for s in steps if s * 10**e >= hi * (1 - 1e-9))
    return below, above


def _wrap(text: str, inches: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``inches`` at ``fontsize`` points."""
    return "\n".join(textwrap.wrap(text, max(12, int(inches * 72 / (0.6 * fontsize)))))


def plot_accuracy(rows: list[Row], path: Path) -> Path:
    """Accuracy (mean over tasks) vs mean kept fraction, a panel per length, a curve per method."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    lengths = sorted({s["length"] for s in summary})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        by_name: dict[str, list[Row]] = defaultdict(list)
        for s in summary:
            if s["length"] == length:
                by_name[curve_label(s["method"])].append(s)
        for name, ss in by_name.items():
            if name == "dense":
                ax.axhline(100 * ss[0]["accuracy"], color="black", ls="--", lw=1, label="dense")
                continue
            ss.sort(key=lambda s: s["kept_fraction"])
            ax.plot([100 * s["kept_fraction"] for s in ss], [100 * s["accuracy"] for s in ss],
                    marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlim(*log_limits(100 * s["kept_fraction"] for s in summary
                                if s["length"] == length and s["name"] != "dense"))
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("mean kept fraction of tokens (%)")
        ax.set_ylabel("accuracy, mean over tasks (%)")
        ax.set_title(f"{length} tokens")
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    # entries of up to ~40 characters in as many columns as the figure is wide (2.6 in each)
    ncol = max(1, min(len(handles), int(5.2 * len(lengths) / 2.6)))
    legend_rows = -(-len(handles) // ncol)
    fig.set_size_inches(5.2 * len(lengths), 4.2 + 0.22 * legend_rows)
    fig.set_layout_engine("constrained")
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol,
               fontsize=9, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmaps(rows: list[Row], path: Path, names: tuple[str, ...] = ("twilight", "tactic"),
                  p: float = 0.9) -> Path | None:
    """Layer x KV head mean kept fraction of the adaptive methods at ``p``, one row per length.

    One panel per method and fixed parameters (e.g. each Twilight base budget), averaged
    over the swept tasks of that length; the y axis gives the model's layer indices.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [{**r, "method": label(r)} for r in swept_rows(rows) if r["name"] in names
          and r.get("layer_head_kept") and r["params"].get("p") == p]
    if not tr:
        return None
    lengths = sorted({r["length"] for r in tr})
    labels = sorted({curve_label(r["method"]) for r in tr})
    width = max(5.0, 3.8 * len(labels))
    fig, axes = plt.subplots(len(lengths), len(labels), squeeze=False,
                             figsize=(width, 4.4 * len(lengths)), layout="constrained")
    for ax_row, length in zip(axes, lengths, strict=True):
        for ax, curve in zip(ax_row, labels, strict=True):
            mats = [r for r in tr if r["length"] == length and curve_label(r["method"]) == curve]
            if not mats:
                ax.axis("off")
                continue
            layers = mats[0]["sparse_layers"]
            heads = len(mats[0]["layer_head_kept"][0])
            grid = [[100 * _mean(r["layer_head_kept"][li][h] for r in mats)
                     for h in range(heads)] for li in range(len(layers))]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
            ax.set_title(_wrap(f"{curve}, p={p}, {length} tokens", width / len(labels), 9),
                         fontsize=9)
            ax.set_xticks(range(heads))
            ax.set_xlabel("KV head")
            ticks = list(range(0, len(layers), max(1, len(layers) // 7)))
            ax.set_yticks(ticks, [str(layers[t]) for t in ticks])
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, label="kept %")
    fig.suptitle(_wrap("mean kept fraction per layer and KV head (mean over the swept tasks)",
                       width, 12), fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
