"""``nucleus-attn bench kernels``: one decode-attention call per method against dense SDPA.

For each context length N and batch B at the Llama-3-8B attention shape (32 query / 8 KV
heads, d=128, bf16) it times, in one run and on the same inputs:

- dense ``scaled_dot_product_attention`` (no mask, GQA through ``enable_gqa``), every
  backend that runs, keeping the fastest: the baseline of every speed-up;
- ``dense`` through ``decode_step`` (our hook's dense path);
- fixed-budget sparse attention over random kept indices at kept fractions 1/2/5/10%
  (``ops.sparse_attention`` alone: the attention kernel's cost at that budget);
- Quest at the same budgets, Twilight (top-p 0.9 / 0.95, once per base selector of
  :data:`TWILIGHT_BASES`) and Tactic (p 0.9), each a whole ``decode_step`` (selection
  included) with the method's metadata prebuilt and the crossover rule off
  (``dense_below=0``: the rows measure the method, not the rule).

After the table it prints, per method setting and batch, the smallest N of the run where
the method beats our dense decode: the data for :data:`nucleus_attn.crossover.DENSE_BELOW`.

Inputs are synthetic *peaked* attention (each key has a component along its group's query
direction, logits spread ~``SPREAD``), on which top-p keeps a few percent of the tokens;
the table reports the fraction each method actually kept. Every call is captured in a
CUDA graph and timed with ``triton.testing.do_bench`` (median; the L2 cache is flushed
before every call). The byte floor of a call is the bytes it must move (counted per method
below) over the bandwidth measured in the same run: the faster of a large device-to-device
copy (read + write counted) and a large read (decode attention mostly reads).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..crossover import gpu_label
from ..decode import decode_step, new_state
from ..methods import make_config
from ..span import KeySpan

SPREAD = 8.0  # logit spread of the synthetic keys: top-p 0.9 keeps ~1-4% of the tokens
INDEX_BYTES = 8  # int64 positions
HALF = 2  # float16 estimated logits
#: Twilight's base selectors, one row set each (helper branches add theirs here)
TWILIGHT_BASES = ("quest", "dense", "cluster")


@dataclass(frozen=True)
class Shape:
    """Attention shape: query heads, KV heads, head dim, dtype."""

    hq: int
    hkv: int
    d: int
    dtype: torch.dtype

    @property
    def es(self) -> int:
        return torch.finfo(self.dtype).bits // 8


LLAMA3_8B = Shape(32, 8, 128, torch.bfloat16)
QUICK = Shape(4, 2, 64, torch.float32)


# --- inputs ------------------------------------------------------------------------------

def peaked_inputs(b: int, shape: Shape, n: int, spread: float, seed: int,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``q [B, Hq, d]``, ``k, v [B, Hkv, N, d]`` built on the device one sequence at a time
    (the recipe of :func:`nucleus_attn.synthetic.peaked_qkv`, without planted keys)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    g, d = shape.hq // shape.hkv, shape.d
    q = torch.randn(b, shape.hkv, g, d, generator=gen, device=device)
    direction = q.mean(2)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    qn = q.norm(dim=-1).mean(-1)  # [B, Hkv]
    k = torch.empty(b, shape.hkv, n, d, dtype=shape.dtype, device=device)
    v = torch.empty_like(k)
    for i in range(b):
        noise = torch.randn(shape.hkv, n, d, generator=gen, device=device) * 0.5
        coef = torch.randn(shape.hkv, n, 1, generator=gen, device=device)
        coef = coef * spread * d**0.5 / qn[i][:, None, None]
        k[i] = (noise + coef * direction[i][:, None, :]).to(shape.dtype)
        v[i] = torch.randn(shape.hkv, n, d, generator=gen, device=device).to(shape.dtype)
    return q.reshape(b, shape.hq, d).to(shape.dtype), k, v


def spread_indices(b: int, h: int, n: int, m: int, seed: int,
                   device: torch.device) -> Tensor:
    """``[B, H, m]`` distinct ascending random positions: one in each of m equal strides."""
    gen = torch.Generator(device=device).manual_seed(seed)
    stride = n // m
    jitter = torch.randint(0, stride, (b, h, m), generator=gen, device=device)
    return torch.arange(m, device=device) * stride + jitter


# --- timing ------------------------------------------------------------------------------

def time_call(fn: Callable[[], Any], device: torch.device, quick: bool) -> float:
    """Median seconds of one call: a CUDA-graph replay timed by ``do_bench`` on a GPU (the
    graph is captured after two warm-up calls), ``perf_counter`` on CPU."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(3 if quick else 10):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]
    import triton

    graph, _ = capture_graph(fn, warmups=2)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms * 1e-3


def capture_graph(fn: Callable[[], Any], warmups: int = 1) -> tuple[Any, Any]:
    """``fn`` captured in a CUDA graph, and what the captured call returned (its tensors are
    the ones each replay rewrites). ``warmups`` eager calls on a side stream come first, so
    that kernels compile and allocations settle outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def bandwidths(device: torch.device, quick: bool) -> tuple[float, float]:
    """Bytes per second of a large device-to-device copy (read + write counted) and of a
    large read (a sum): decode attention mostly reads, and reads run faster than copies."""
    nbytes = (64 << 20) if quick or device.type != "cuda" else (2 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    copy = 2 * nbytes / time_call(lambda: dst.copy_(src), device, quick)
    read = nbytes / time_call(lambda: src.sum(dtype=torch.float32), device, quick)
    return copy, read


def best_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, device: torch.device,
              quick: bool) -> tuple[str, float]:
    """Fastest backend of dense SDPA (no mask, GQA via ``enable_gqa``) and its seconds."""
    q4 = q[:, :, None, :]

    def call(backend: Any = None) -> Callable[[], Tensor]:
        def fn() -> Tensor:
            if backend is None:
                return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)
        return fn

    if device.type != "cuda":
        return "default", time_call(call(), device, quick)
    from torch.nn.attention import SDPBackend

    best = ("none", math.inf)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):
        try:
            sec = time_call(call(backend), device, quick)
        except RuntimeError:  # this backend does not take these inputs
            torch.cuda.synchronize()
            continue
        if sec < best[1]:
            best = (backend.name.lower(), sec)
    if best[1] == math.inf:
        best = ("default", time_call(call(), device, quick))
    return best


# --- bytes that must move ----------------------------------------------------------------

def kv_bytes(tokens: float, shape: Shape) -> float:
    """Bytes of K and V rows plus their int64 positions for ``tokens`` gathered tokens."""
    return tokens * (2 * shape.d * shape.es + INDEX_BYTES)


def floor_bytes(kind: str, b: int, n: int, shape: Shape, kept: float, cfg: Any = None,
                candidates: float = 0.0) -> float:
    """Bytes one call must move: ``kept`` and ``candidates`` are token counts summed over
    sequences and KV heads; the metadata each method reads is counted from its config."""
    rows = b * shape.hkv
    if kind == "dense":
        return rows * n * 2 * shape.d * shape.es
    if kind == "sparse":
        return kv_bytes(kept, shape)
    pages = 0.0
    base = getattr(cfg, "base", "quest")
    if kind == "quest" or (kind == "twilight" and base == "quest"):
        ps = cfg.page_size
        pages = rows * math.ceil(n / ps) * 2 * shape.d * shape.es  # per-page min and max
    if kind == "quest":
        return pages + kv_bytes(kept, shape)
    if kind == "twilight":
        # codes, scale and zero of every candidate, and its position (none in range mode)
        index = 0 if base == "dense" else INDEX_BYTES
        int4 = candidates * (shape.d // 2 + 2 * shape.es + index)
        cents = 0.0
        if base == "cluster":  # every centroid, its size and its spread, to rank clusters
            tcfg = cfg.cluster_config()
            clusters = rows * math.ceil(n * (1 / tcfg.cluster_size + tcfg.outliers))
            cents = clusters * (shape.d * shape.es + 8 + 4)
        return pages + cents + int4 + kv_bytes(kept, shape)
    if kind == "tactic":
        from . import tactic

        return tactic.floor_bytes(b, n, shape.hkv, shape.d, shape.es, shape.hq // shape.hkv,
                                  cfg, kept)
    raise ValueError(f"unknown kind {kind!r}")


# --- one (N, B) point --------------------------------------------------------------------

ROW_METHODS = ("dense", "sparse", "quest", "twilight", "tactic")


def bench_point(n: int, b: int, shape: Shape, fractions: list[float], bw: float, seed: int,
                device: torch.device, quick: bool, log: Callable[[str], None],
                methods: tuple[str, ...] = ROW_METHODS) -> list[dict]:
    """Every row of one context length and batch size."""
    q, k, v = peaked_inputs(b, shape, n, SPREAD, seed, device)
    scale = 1.0 / math.sqrt(shape.d)
    span = KeySpan.full(b, n, device)
    rows: list[dict] = []

    def add(method: str, setting: str, sec: float, nbytes: float, kept: float) -> None:
        rows.append({"n": n, "batch": b, "method": method, "setting": setting,
                     "kept_fraction": kept, "seconds": sec, "bytes": nbytes,
                     "floor_seconds": nbytes / bw})
        log(f"  N={n} B={b} {method:<10} {setting:<22} kept {kept * 100:6.2f}%  "
            f"{sec * 1e6:9.1f} us")

    backend, sec = best_sdpa(q, k, v, scale, device, quick)
    dense_bytes = floor_bytes("dense", b, n, shape, 0)
    add("sdpa", backend, sec, dense_bytes, 1.0)

    def method_row(name: str, setting: str, kind: str, **params: Any) -> None:
        cfg = make_config(name, dense_below=0, **params)
        state = new_state(cfg, k, span)
        out, info = decode_step(q, k, v, cfg, state, span, scale, padded=False)
        kept = info.kept.sum().item()
        cand = info.candidates.sum().item()
        sec = time_call(lambda: decode_step(q, k, v, cfg, state, span, scale, padded=False),
                        device, quick)
        nbytes = dense_bytes if kind == "dense" else floor_bytes(kind, b, n, shape, kept, cfg,
                                                                 cand)
        add(name, setting, sec, nbytes, kept / (b * shape.hkv * n))

    if "dense" in methods:
        method_row("dense", "decode_step", "dense")
    for f in fractions if "sparse" in methods else []:
        m = max(1, math.ceil(f * n))
        idx = spread_indices(b, shape.hkv, n, m, seed, device)
        cnt = torch.full((b, shape.hkv), m, dtype=torch.int64, device=device)
        sec = time_call(lambda idx=idx, cnt=cnt: ops.sparse_attention(q, k, v, idx, cnt, scale),
                        device, quick)
        add("sparse", f"random {f * 100:g}%", sec, floor_bytes("sparse", b, n, shape,
                                                               m * b * shape.hkv), m / n)
    for f in fractions if "quest" in methods else []:
        method_row("quest", f"budget={f:g}", "quest", budget=f)
    for base in TWILIGHT_BASES if "twilight" in methods else ():
        for p in (0.9, 0.95):
            method_row("twilight", f"p={p:g} base={base}", "twilight", p=p, base=base)
    if "tactic" in methods:
        method_row("tactic", "p=0.9", "tactic", p=0.9)
    return rows


def stage_floor_bytes(stage: str, b: int, n: int, shape: Shape, *, pages: int = 0,
                      candidates: float = 0.0, kept: float = 0.0) -> float:
    """Bytes one selection stage must move at least (reads plus writes), from the shapes
    and the token counts the stage before it produced (summed over sequences and KV heads):
    what its time is compared against in the ``--profile`` table."""
    rows, g = b * shape.hkv, shape.hq // shape.hkv
    logit = 4  # float32 page bounds
    if stage == "page_scores":  # page min/max in, one bound per page and query head out
        return rows * pages * (2 * shape.d * shape.es + g * logit)
    if stage == "topk_pages":  # the bounds in, the chosen pages' token positions out
        return rows * pages * g * logit + candidates * INDEX_BYTES
    if stage == "int4_estimates":  # codes, scale, zero and position in, a float16 logit per
        return candidates * (shape.d // 2 + 2 * shape.es + INDEX_BYTES + g * HALF)  # head out
    if stage == "int4_estimates_range":
        return rows * n * (shape.d // 2 + 2 * shape.es + g * HALF)
    if stage == "topp_select_estimates":  # the logits read once, the kept positions written
        return candidates * g * HALF + kept * INDEX_BYTES
    if stage == "sparse_attention":
        return kv_bytes(kept, shape)
    raise ValueError(f"unknown stage {stage!r}")


def profile_point(n: int, b: int, shape: Shape, bw: float, seed: int,
                  device: torch.device, quick: bool, with_tactic: bool = True) -> list[dict]:
    """Seconds of each stage of Quest, Twilight (per base of :data:`TWILIGHT_BASES`) and
    Tactic at one point, each stage timed alone (CUDA graph) on the inputs the stage before
    it produced, next to its byte floor and the whole step. On a GPU it also lists every
    kernel launch of one eager Quest and Twilight step with its GPU time (the split
    selection kernels' phases one by one). Where a target is missed this says where the
    time goes."""
    from ..methods.base import resolve_budget

    q, k, v = peaked_inputs(b, shape, n, SPREAD, seed, device)
    scale = 1.0 / math.sqrt(shape.d)
    span = KeySpan.full(b, n, device)
    out: list[dict] = []

    def stage(method: str, name: str, fn: Callable[[], Any], nbytes: float) -> Any:
        sec = time_call(fn, device, quick)
        out.append({"n": n, "batch": b, "method": method, "stage": name, "seconds": sec,
                    "bytes": nbytes, "floor_seconds": nbytes / bw})
        return fn()

    def tokens(counts: Tensor) -> float:
        return float(counts.sum().item())

    runs = [("quest", {"budget": 0.01}, "quest")]
    runs += [("twilight", {"p": 0.9, "base": base}, f"twilight base={base}")
             for base in TWILIGHT_BASES]
    for method, params, label in runs:
        cfg = make_config(method, dense_below=0, **params)
        st = new_state(cfg, k, span)
        pages = st if method == "quest" else getattr(st, "pages", None)
        if method == "twilight" and cfg.base not in ("quest", "dense"):
            continue  # a base this function does not know the stages of (whole step below)
        if pages is not None:
            p = pages.pages
            ps = cfg.page_size
            bounds, pst = stage(label, "page_scores", lambda pages=pages, p=p, ps=ps:
                                ops.page_scores(q, pages.kmin[:, :, :p], pages.kmax[:, :, :p],
                                                span, ps, stats=True, scale=scale),
                                stage_floor_bytes("page_scores", b, n, shape, pages=p))
            budget = resolve_budget(cfg.budget if method == "quest" else cfg.base_budget, n)

            def topk(bounds=bounds, pst=pst, budget=budget, cfg=cfg, ps=ps):
                # fresh stats each call: their workspace is used once
                st2 = ops.PageStats(pst.chunk, pst.scale, pst.max, pst.min, pst.sumexp)
                return ops.topk_pages(bounds, shape.hkv, span, ps, math.ceil(budget / ps),
                                      cfg.sink, max(cfg.window, 1), scale, stats=st2)
            cand, ccnt = topk()
            stage(label, "topk_pages", topk, stage_floor_bytes(
                "topk_pages", b, n, shape, pages=p, candidates=tokens(ccnt)))
        if method == "twilight":
            keys = st.keys
            if cfg.base == "dense":
                kw: dict[str, Any] = {}
                name, est_bytes = "int4_estimates_range", stage_floor_bytes(
                    "int4_estimates_range", b, n, shape)
            else:
                kw = {"indices": cand, "counts": ccnt}
                name, est_bytes = "int4_estimates", stage_floor_bytes(
                    "int4_estimates", b, n, shape, candidates=tokens(ccnt))
            est = stage(label, name, lambda keys=keys, kw=kw: ops.int4_estimates(
                q, keys.codes, keys.scale, keys.zero, scale, span=span, **kw), est_bytes)

            def topp(est=est, cfg=cfg):  # (a fresh workspace each call: it is used once)
                return ops.topp_select_estimates(
                    ops.Estimates(est.values, est.chunk_max, est.span, est.indices, est.counts),
                    cfg.p, sink=cfg.sink, window=cfg.window)
            kept, kcnt = topp()
            stage(label, "topp_select_estimates", topp, stage_floor_bytes(
                "topp_select_estimates", b, n, shape, candidates=float(est.live().sum()),
                kept=tokens(kcnt)))
        else:
            kept, kcnt = cand, ccnt
        stage(label, "sparse_attention", lambda kept=kept, kcnt=kcnt:
              ops.sparse_attention(q, k, v, kept, kcnt, scale),
              stage_floor_bytes("sparse_attention", b, n, shape, kept=tokens(kcnt)))
        sel_bytes = sum(r["bytes"] for r in out if r["method"] == label)
        stage(label, "whole step", lambda cfg=cfg, st=st: decode_step(
            q, k, v, cfg, st, span, scale, padded=False), sel_bytes)
    if with_tactic:  # Tactic's own stages (bench/tactic.py), on the same inputs
        from . import tactic

        info = tactic.profile_stages(q, k, v, span, scale, stage, device)
        out[-1].update(info)  # kept and scored fractions, launches, on the whole-step row
        print(f"tactic: {info}")
    if device.type == "cuda":  # where a whole step's time goes, launch by launch
        for method, params, label in runs + ([("tactic", {"p": 0.9}, "tactic")]
                                             if with_tactic else []):
            c2 = make_config(method, dense_below=0, **params)
            st2 = new_state(c2, k, span)
            kernel_launches(label, lambda c2=c2, st2=st2: decode_step(
                q, k, v, c2, st2, span, scale, padded=False))
    return out


def kernel_launches(label: str, fn: Callable[[], Any]) -> None:
    """Print every GPU kernel of one eager call of ``fn`` in launch order with its time
    (torch.profiler; a warm-up call first): the phases of one split kernel appear as
    separate lines."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if getattr(e, "device_type", None) is not None
              and str(e.device_type).endswith("CUDA")]
    events.sort(key=lambda e: e.time_range.start)
    total = sum(e.time_range.elapsed_us() for e in events)
    print(f"launches of one {label} step (eager, GPU us; {len(events)} kernels, "
          f"{total:.1f} us busy):")
    for e in events:
        print(f"  {e.time_range.elapsed_us():8.1f}  {e.name[:100]}")


def kernel_times(fn: Callable[[], Any], top: int) -> tuple[float, list[dict], int]:
    """GPU time of one eager call of ``fn`` (after a warm-up call), by kernel name
    (torch.profiler): the total in us, the ``top`` kernels (longest first) and how many
    kernel kinds ran."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()

    def gpu_us(e: Any) -> float:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))

    events = sorted(prof.key_averages(), key=lambda e: -gpu_us(e))
    kernels = [{"kernel": e.key[:120], "us": gpu_us(e), "calls": e.count} for e in events[:top]]
    return sum(gpu_us(e) for e in events), kernels, len(events)


def write_results(stem: str, meta: dict, rows: list[dict],
                  plot: Callable[[list[dict], str, dict], None] | None = None) -> None:
    """``<stem>.json`` with the meta and the rows; with ``plot``, also ``<stem>.png``."""
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if plot is None:
        return
    try:
        plot(rows, stem + ".png", meta)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'nucleus-attn[plot]')")
        print(f"wrote {stem}.json")
        return
    print(f"wrote {stem}.json and {stem}.png")


def fits(n: int, b: int, shape: Shape, device: torch.device) -> bool:
    """Whether the inputs plus the largest method state (and temporaries) fit in memory."""
    if device.type != "cuda":
        return True
    kv = 2 * b * shape.hkv * n * shape.d * shape.es
    need = 1.7 * kv + 3 * (1 << 30)
    free, _ = torch.cuda.mem_get_info(device)
    return need < free


# --- report ------------------------------------------------------------------------------

def add_ratios(rows: list[dict]) -> None:
    """Speed-up against the same point's dense SDPA and the fraction of the byte floor."""
    dense = {(r["n"], r["batch"]): r["seconds"] for r in rows if r["method"] == "sdpa"}
    for r in rows:
        r["speedup"] = dense[(r["n"], r["batch"])] / r["seconds"]
        r["floor_fraction"] = r["floor_seconds"] / r["seconds"]


def print_table(rows: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    tb = {k: meta[k] / 1e12 for k in ("floor_bandwidth", "copy_bandwidth", "read_bandwidth")}
    table = Table(title=f"decode attention per call, {meta['gpu']} (floor at "
                  f"{tb['floor_bandwidth']:.2f} TB/s: copy {tb['copy_bandwidth']:.2f}, read "
                  f"{tb['read_bandwidth']:.2f}), CUDA graphs"
                  if meta["device"] == "cuda" else "decode attention per call (CPU smoke)")
    for col in ("N", "B", "method", "setting", "kept %", "us", "x SDPA", "floor us",
                "% floor"):
        table.add_column(col, justify="left" if col in ("method", "setting") else "right")
    for r in rows:
        table.add_row(str(r["n"]), str(r["batch"]), r["method"], r["setting"],
                      f"{r['kept_fraction'] * 100:.2f}", f"{r['seconds'] * 1e6:.1f}",
                      f"{r['speedup']:.2f}", f"{r['floor_seconds'] * 1e6:.1f}",
                      f"{r['floor_fraction'] * 100:.0f}")
    Console(width=140).print(table)
    for s in meta["skipped"]:
        print(f"skipped: {s}")
    cross = crossovers(rows)
    if cross:
        print(f"crossover on {meta['gpu']} (smallest N of this run where the method beats our "
              "dense decode; the data for nucleus_attn.crossover.DENSE_BELOW):")
        for (method, setting), per_batch in sorted(cross.items()):
            cells = ", ".join(f"B={bb}: {'N>=' + str(nn) if nn else 'never'}"
                              for bb, nn in sorted(per_batch.items()))
            print(f"  {method:<10} {setting:<22} {cells}")


def crossovers(rows: list[dict]) -> dict[tuple[str, str], dict[int, int | None]]:
    """Per (method, setting) and batch: the smallest N of the run at which the method is
    faster than our dense decode at that (N, B) (or than SDPA where the dense row did not
    run), None when it never is."""
    dense = {(r["n"], r["batch"]): r["seconds"] for r in rows if r["method"] == "dense"}
    sdpa = {(r["n"], r["batch"]): r["seconds"] for r in rows if r["method"] == "sdpa"}
    out: dict[tuple[str, str], dict[int, int | None]] = {}
    for r in rows:
        if r["method"] in ("sdpa", "dense", "sparse"):
            continue
        ref = dense.get((r["n"], r["batch"]), sdpa.get((r["n"], r["batch"])))
        per = out.setdefault((r["method"], r["setting"]), {})
        per.setdefault(r["batch"], None)
        if ref is not None and r["seconds"] < ref:
            best = per[r["batch"]]
            per[r["batch"]] = r["n"] if best is None else min(best, r["n"])
    return out


def print_profile(stages: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = stages[0]
    table = Table(title=f"stages, N={first['n']} B={first['batch']} (each timed alone; the "
                  "floor is the bytes the stage must move)")
    for col in ("method", "stage", "us", "floor us", "x floor", "us over floor"):
        table.add_column(col, justify="left" if col in ("method", "stage") else "right")
    for r in stages:
        has = bool(r["bytes"])
        table.add_row(r["method"], r["stage"], f"{r['seconds'] * 1e6:.1f}",
                      f"{r['floor_seconds'] * 1e6:.1f}" if has else "",
                      f"{r['seconds'] / r['floor_seconds']:.1f}" if has else "",
                      f"{(r['seconds'] - r['floor_seconds']) * 1e6:.1f}" if has else "")
    Console(width=120).print(table)


def plot_series(r: dict) -> str:
    """The line a row belongs to in the plot: the method, and Twilight's base."""
    base = next((w for w in r["setting"].split() if w.startswith("base=")), "")
    return f"{r['method']} {base}".strip()


PLOT_STYLES = {"sparse": "o-", "quest": "s-", "twilight base=quest": "^",
               "twilight base=dense": "v", "twilight base=cluster": "<", "tactic": "D",
               "dense": "x"}


def plot(rows: list[dict], path: str, meta: dict) -> None:
    """Speed-up against dense SDPA vs kept fraction: one panel per (N, batch), one line per
    method (and per Twilight base); the dashed line is dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), len(ns), figsize=(4.2 * len(ns),
                                                               3.3 * len(batches)),
                             squeeze=False)
    for i, b in enumerate(batches):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            here = [r for r in rows if r["n"] == n and r["batch"] == b and r["method"] != "sdpa"]
            for series in sorted({plot_series(r) for r in here},
                                 key=lambda s: list(PLOT_STYLES).index(s)
                                 if s in PLOT_STYLES else len(PLOT_STYLES)):
                pts = sorted((r["kept_fraction"] * 100, r["speedup"]) for r in here
                             if plot_series(r) == series)
                ax.plot(*zip(*pts, strict=True), PLOT_STYLES.get(series, "+"), label=series)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_title(f"N={n}, B={b}", fontsize=10)
            if i == len(batches) - 1:
                ax.set_xlabel("kept tokens (%)")
            if j == 0:
                ax.set_ylabel("speed-up vs dense SDPA")
            if here and i == 0 and j == len(ns) - 1:
                ax.legend(fontsize=7)
    fig.suptitle(f"decode attention per call, {meta['gpu']}, Llama-3-8B heads (selection "
                 "included)" if meta["device"] == "cuda" else "decode attention (CPU smoke)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out: str = "results", quick: bool = False, ns: list[int] | None = None,
         batches: list[int] | None = None, fractions: list[float] | None = None,
         seed: int = 0, profile: tuple[int, int] | None = None,
         methods: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``bench_kernels_<gpu>.json/.png``."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type != "cuda" and not quick:
        print("nucleus-attn bench kernels needs a CUDA GPU; use --quick for a CPU smoke test")
        return 2
    shape = QUICK if quick else LLAMA3_8B
    ns = ns or ([512] if quick else [4096, 8192, 32768, 131072])
    batches = batches or ([2] if quick else [1, 8, 32])
    fractions = fractions or ([0.1] if quick else [0.01, 0.02, 0.05, 0.1])
    if quick:  # the torch references on CPU; kernels are for the GPU
        os.environ.setdefault("NUCLEUS_ATTN_BACKEND", "torch")
    log = print if not quick else (lambda s: None)
    copy_bw, read_bw = bandwidths(device, quick)
    bw = max(copy_bw, read_bw)  # the byte floors use the faster of the two
    meta: dict[str, Any] = {
        "gpu": gpu_label(device), "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor(), "copy_bandwidth": copy_bw, "read_bandwidth": read_bw,
        "floor_bandwidth": bw, "torch": torch.__version__,
        "shape": {"hq": shape.hq, "hkv": shape.hkv, "d": shape.d, "dtype": str(shape.dtype)},
        "spread": SPREAD, "skipped": [],
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"bench_kernels_{meta['gpu']}")
    rows: list[dict] = []
    # the batch of the headline targets (8) first, so that a cut-off run still has them
    order = sorted(batches, key=lambda x: (x != 8, x))
    for b in order:
        for n in sorted(ns, reverse=True):
            if not fits(n, b, shape, device):
                meta["skipped"].append(f"N={n} B={b}: does not fit in GPU memory")
                continue
            rows += bench_point(n, b, shape, fractions, bw, seed, device, quick, log,
                                tuple(methods or ROW_METHODS))
            add_ratios(rows)
            write_results(stem, meta, rows)  # after every point: partial runs count
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows.sort(key=lambda r: (r["n"], r["batch"]))
    meta["crossover"] = {f"{m} {st}": {str(bb): nn for bb, nn in per.items()}
                         for (m, st), per in crossovers(rows).items()}
    print_table(rows, meta)
    if "tactic" in (methods or ROW_METHODS):  # what clustering adds to prefill
        from . import tactic

        meta["tactic_prefill"] = tactic.prefill_rows(
            [512] if quick else [32768, 131072], shape.hq, shape.hkv, shape.d, shape.dtype,
            device, quick)
        tactic.print_prefill(meta["tactic_prefill"])
    if profile is not None:  # last: a stage that fails cannot cost the rows above
        write_results(stem, meta, rows)
        meta["profile"] = profile_point(profile[0], profile[1], shape, bw, seed, device, quick,
                                        "tactic" in (methods or ROW_METHODS))
        print_profile(meta["profile"])
    write_results(stem, meta, rows, plot)
    return 0
