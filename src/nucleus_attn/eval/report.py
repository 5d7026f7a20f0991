"""Eval rows to a markdown table and PNG plots.

A row is one (task or perplexity, context length, method setting) cell of a sweep, with the
budget that bought its accuracy: mean and spread of the kept fraction over layers and
heads, and the exact attention mass kept (diagnostics mode). Rows are plain dicts, read
from and written to JSON lines by :mod:`nucleus_attn.eval.store`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def task_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.get("kind") == "task"]


def summarize(rows: list[Row]) -> list[Row]:
    """One row per (length, method): accuracy averaged over tasks, budget averaged too."""
    groups: dict[tuple[int, str], list[Row]] = defaultdict(list)
    for r in task_rows(rows):
        groups[(r["length"], r["method"])].append(r)
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


def markdown(rows: list[Row]) -> str:
    """Tables per context length: accuracy per task and mean, kept fraction, mass kept."""
    lines: list[str] = []
    summary = summarize(rows)
    tasks = sorted({t for s in summary for t in s["tasks"]})
    for length in sorted({s["length"] for s in summary}):
        lines += [f"### {length} tokens", ""]
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
        for r in sorted(ppl, key=lambda r: (r["length"], r["name"], r["kept_fraction"])):
            lines.append(f"| {r['length']} | {r['method']} | {r['ppl']:.3f} | "
                         f"{100 * r['kept_fraction']:.2f} ({100 * r['kept_fraction_std']:.2f}) | "
                         f"{r['mass']:.4f} ({r['mass_min']:.3f}) | {r['tokens']} |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(rows: list[Row], path: Path) -> Path:
    """Accuracy (mean over tasks) vs mean kept fraction, a panel per length, a curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    lengths = sorted({s["length"] for s in summary})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        by_name: dict[str, list[Row]] = defaultdict(list)
        for s in summary:
            if s["length"] == length:
                by_name[s["name"]].append(s)
        for name, ss in by_name.items():
            if name == "dense":
                ax.axhline(100 * ss[0]["accuracy"], color="black", ls="--", lw=1, label="dense")
                continue
            ss.sort(key=lambda s: s["kept_fraction"])
            ax.plot([100 * s["kept_fraction"] for s in ss], [100 * s["accuracy"] for s in ss],
                    marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("mean kept fraction of tokens (%)")
        ax.set_ylabel("accuracy, mean over tasks (%)")
        ax.set_title(f"{length} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmaps(rows: list[Row], path: Path, names: tuple[str, ...] = ("twilight", "tactic"),
                  ) -> Path | None:
    """Layer x head mean kept fraction for each adaptive method setting at the longest length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in task_rows(rows) if r["name"] in names and r.get("layer_head_kept")]
    if not tr:
        return None
    length = max(r["length"] for r in tr)
    cells: dict[str, list[list[list[float]]]] = defaultdict(list)
    for r in tr:
        if r["length"] == length:
            cells[r["method"]].append(r["layer_head_kept"])
    methods = sorted(cells, key=lambda m: (m.split(":")[0], m))
    cols = min(4, len(methods))
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, methods, strict=False):
        mats = cells[m]
        layers, heads = len(mats[0]), len(mats[0][0])
        grid = [[100 * _mean(mat[li][h] for mat in mats) for h in range(heads)]
                for li in range(layers)]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0,
                       vmax=max(1.0, max(max(g) for g in grid)))
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="kept %")
    fig.suptitle(f"mean kept fraction per layer and KV head, {length} tokens (mean over tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
