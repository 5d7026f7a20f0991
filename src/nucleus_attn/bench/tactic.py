"""Tactic in the kernel benchmark: its byte floor, its stages, and what clustering costs.

- :func:`floor_bytes`: the bytes a Tactic decode step must move (centroids and their
  per-cluster numbers, the exactly scored keys, the kept keys and values);
- :func:`profile_stages`: each of the four selection ops timed alone (CUDA graph) with its
  byte floor, the selection as a whole, the attention over its result, the whole step,
  and the number of kernel launches of one step;
- :func:`prefill_rows`: the state build at prefill (K-means, outlier singletons, spreads,
  member lists) next to the prefill's own causal attention, so that users see what
  clustering adds to the time to first token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from ..decode import decode_step, new_state
from ..methods import make_config, spec_of
from ..span import KeySpan

INDEX_BYTES = 8  # int64 positions


def clusters_per_row(n: int, cfg: Any) -> int:
    """Cluster slots of one KV head: K-means segments plus the outlier singletons."""
    per_seg = math.ceil(cfg.segment / cfg.cluster_size)
    return math.ceil(n / cfg.segment) * per_seg + math.ceil(cfg.outliers * n)


def stage_bytes(rows: int, n: int, d: int, es: int, g: int, cfg: Any, kept: float,
                scored: float) -> dict[str, float]:
    """Bytes each selection stage must move; ``kept`` and ``scored`` are token counts summed
    over sequences and KV heads (kept: the selection's result; scored: the members of the
    sampled clusters plus the always-kept tokens)."""
    used = rows * (n / cfg.cluster_size + cfg.outliers * n)  # clusters that hold tokens
    return {
        # centroids, sizes (int64) and spreads (float32); the scores and bins it writes
        "rank_clusters": used * (d * es + 8 + 4 + 4 * g + 4),
        # member positions (int32) and keys of the sampled clusters and fixed tokens
        "cluster_lse": scored * (d * es + 4),
        "tactic_cut": 0.0,  # a few numbers per sampled cluster
        # the kept clusters' member positions, read as int32 and written as int64
        "append_clusters": kept * (4 + INDEX_BYTES),
    }


def floor_bytes(b: int, n: int, hkv: int, d: int, es: int, g: int, cfg: Any, kept: float,
                scored: float | None = None) -> float:
    """Bytes of a whole Tactic step: the selection's stages plus the kept keys and values."""
    rows = b * hkv
    if scored is None:  # the nominal head, two segments and the always-kept tokens
        scored = rows * (math.ceil(cfg.exact_fraction * n) + 2 * cfg.sample_tokens
                         + cfg.sink + cfg.window)
    sel = sum(stage_bytes(rows, n, d, es, g, cfg, kept, scored).values())
    return sel + kept * (2 * d * es + INDEX_BYTES)


def profile_stages(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: KeySpan,
                   scale: float, stage: Callable[[str, str, Callable[[], Any], float], Any],
                   device: torch.device, p: float = 0.9) -> dict[str, Any]:
    """Time Tactic's stages with ``stage(method, name, fn, bytes)`` (which returns ``fn()``);
    returns the kept and scored token counts and the launches of one selection."""
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    es = k.element_size()
    cfg = make_config("tactic", p=p, dense_below=0)  # the method, not the crossover rule
    st = new_state(cfg, k, span)
    rows = b * hkv
    spread = st.spread if cfg.spread_rank else None
    cap = st.fixed_capacity()
    labels = st.labels[:, :, :n]

    def rank() -> Any:
        return ops.rank_clusters(q, st.centroids, st.sizes, spread, scale,
                                 head_fraction=cfg.exact_fraction,
                                 sample_positions=cfg.sample_positions,
                                 sample_tokens=cfg.sample_tokens)

    r0 = rank()
    m0 = ops.cluster_lse(q, k, r0, st.members, st.offsets, st.sizes, labels, span, st.ends,
                         cfg.sink, cfg.window, cap, scale)
    p0, kept0, cnt0 = ops.tactic_cut(m0, r0, cfg.p, labels, span, st.ends, cfg.sink,
                                     cfg.window, cap)
    sampled = ops.tactic_select.sampled_mask(r0, st.sizes)
    fpos, fcnt = ops.tactic_select.fixed_positions(span, st.ends, cfg.sink, cfg.window, cap)
    scored = float((st.sizes * sampled).sum().item() + hkv * fcnt.sum().item())
    counts0 = cnt0.clone()
    ops.append_clusters(kept0, cnt0, st.members, st.offsets, st.sizes, r0.bins, p0)
    kept = float(cnt0.sum().item())
    nb = stage_bytes(rows, n, d, es, hq // hkv, cfg, kept, scored)
    stage("tactic", "rank_clusters", rank, nb["rank_clusters"])
    stage("tactic", "cluster_lse", lambda: ops.cluster_lse(
        q, k, r0, st.members, st.offsets, st.sizes, labels, span, st.ends, cfg.sink,
        cfg.window, cap, scale), nb["cluster_lse"])
    stage("tactic", "tactic_cut", lambda: ops.tactic_cut(
        m0, r0, cfg.p, labels, span, st.ends, cfg.sink, cfg.window, cap), nb["tactic_cut"])
    work = cnt0.clone()
    stage("tactic", "append_clusters", lambda: ops.append_clusters(
        kept0, work.copy_(counts0), st.members, st.offsets, st.sizes, r0.bins, p0),
        nb["append_clusters"])
    select = spec_of(cfg).select
    sel = stage("tactic", "select (all)", lambda: select(q, k, st, span, cfg, scale),
                sum(nb.values()))
    stage("tactic", "sparse_attention", lambda: ops.sparse_attention(
        q, k, v, sel.indices, sel.counts, scale), kept * (2 * d * es + INDEX_BYTES))
    stage("tactic", "whole step", lambda: decode_step(q, k, v, cfg, st, span, scale,
                                                      padded=False),
          sum(nb.values()) + kept * (2 * d * es + INDEX_BYTES))
    out: dict[str, Any] = {"kept_fraction": kept / (rows * n),
                           "scored_fraction": scored / (rows * n),
                           "clusters": st.centroids.shape[2]}
    if device.type == "cuda":
        from .kernels import kernel_times

        _, kernels, kinds = kernel_times(lambda: select(q, k, st, span, cfg, scale), 40)
        out["select_launches"] = sum(x["calls"] for x in kernels)
        out["select_kernel_kinds"] = kinds
    return out


def _seconds(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median wall seconds of eager calls (synchronised): the state build syncs once with
    the host, so it cannot be captured in a graph."""
    times = []
    for _ in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times = times[1:]  # the first call compiles
    return sorted(times)[len(times) // 2]


def prefill_rows(ns: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype,
                 device: torch.device, quick: bool) -> list[dict]:
    """Seconds of Tactic's state build (one layer, B=1) next to that layer's causal prefill
    attention (SDPA, GQA) at each context length."""
    rows = []
    cfg = make_config("tactic")
    for n in ns:
        gen = torch.Generator(device=device).manual_seed(n)
        q = torch.randn(1, hq, n, d, generator=gen, device=device).to(dtype)
        k = torch.randn(1, hkv, n, d, generator=gen, device=device).to(dtype)
        span = KeySpan.full(1, n, device)
        repeat = 1 if quick else 3
        attn = _seconds(lambda q=q, k=k: F.scaled_dot_product_attention(
            q, k, k, is_causal=True, enable_gqa=True), device, repeat)
        build = _seconds(lambda k=k, span=span: new_state(cfg, k, span), device, repeat)
        rows.append({"n": n, "batch": 1, "prefill_attention_s": attn, "kmeans_build_s": build,
                     "build_over_attention": build / attn})
        del q, k
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_prefill(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Tactic at prefill: state build (K-means etc.) vs causal attention, "
                  "one layer, B=1")
    for col in ("N", "attention ms", "build ms", "build / attention"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["n"]), f"{r['prefill_attention_s'] * 1e3:.1f}",
                      f"{r['kmeans_build_s'] * 1e3:.1f}", f"{r['build_over_attention']:.2f}")
    Console(width=100).print(table)
