"""``nucleus-attn compare``: every method on one synthetic decode step with peaked attention.

A quick look, without a model, at what each method keeps and what it costs in accuracy:
kept and candidate fractions, the exact attention mass kept, the output error against
dense attention and whether the planted strong keys survived.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from . import describe, make_config, methods, parse_method, sparse_decode
from .cliargs import add_methods_argument
from .synthetic import peaked_qkv


def default_settings() -> list[str]:
    """One representative setting per registered method."""
    picks = {"oracle-topk": "oracle-topk:budget=0.02", "streaming": "streaming:window=0.05",
             "quest": "quest:budget=0.05"}  # the top-p methods at their default p
    return [picks.get(name, name) for name in methods()]


def compare(settings: list[str], *, batch: int = 1, q_heads: int = 32, kv_heads: int = 8,
            n: int = 8192, d: int = 128, seed: int = 0, spread: float = 2.5,
            planted: int = 4) -> list[dict[str, Any]]:
    """One row of measurements per method setting on the same synthetic inputs."""
    x = peaked_qkv(batch, q_heads, kv_heads, n, d, planted=planted, spread=spread, seed=seed)
    ref, _ = sparse_decode(x.q, x.k, x.v, "dense")
    rows = []
    for text in settings:
        cfg = parse_method(text) if ":" in text else make_config(text)
        start = time.perf_counter()
        out, info = sparse_decode(x.q, x.k, x.v, cfg, diagnostics=True)
        seconds = time.perf_counter() - start
        frac = info.kept_fraction
        rows.append({
            "method": describe(cfg),
            "kept_fraction": frac.mean().item(),
            "kept_fraction_min": frac.min().item(),
            "kept_fraction_max": frac.max().item(),
            "candidate_fraction": (info.candidates.float() / n).mean().item(),
            "mass": info.mass.mean().item(),
            "mass_min": info.mass.min().item(),
            "rel_error": ((out.float() - ref.float()).norm() / ref.float().norm()).item(),
            "planted_kept": info.kept_mask(n).gather(-1, x.planted).float().mean().item(),
            "seconds": seconds,
        })
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_methods_argument(parser, metavar="NAME[:k=v,...]",
                         help="method settings (default: one per registered method)")
    parser.add_argument("--n", type=int, default=8192, help="context length N (default 8192)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--q-heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim d (default 128)")
    parser.add_argument("--spread", type=float, default=2.5,
                        help="std of ordinary logits: larger is more peaked (default 2.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    torch.set_grad_enabled(False)
    rows = compare(args.methods or default_settings(), batch=args.batch, q_heads=args.q_heads,
                   kv_heads=args.kv_heads, n=args.n, d=args.head_dim, seed=args.seed,
                   spread=args.spread)
    table = Table(title=f"one decode step, synthetic peaked attention: B={args.batch}, "
                        f"Hq={args.q_heads}, Hkv={args.kv_heads}, N={args.n}, d={args.head_dim}")
    for col in ("method", "kept % (min-max)", "candidates %", "mass kept (min)",
                "rel. error", "planted kept", "CPU ms"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            f"{100 * r['kept_fraction']:.2f} ({100 * r['kept_fraction_min']:.1f}-"
            f"{100 * r['kept_fraction_max']:.1f})",
            f"{100 * r['candidate_fraction']:.1f}",
            f"{r['mass']:.4f} ({r['mass_min']:.3f})",
            f"{r['rel_error']:.4f}",
            f"{100 * r['planted_kept']:.0f}%",
            f"{1000 * r['seconds']:.0f}",
        )
    console = Console()
    if not console.is_terminal:
        console.width = 140  # logs and pipes: keep the table on one line per row
    console.print(table)
    if any(math.isnan(r["rel_error"]) for r in rows):
        return 1
    return 0
