"""Launch settings of the selection kernels, timed side by side on one GPU (CUDA only).

For the Llama-3-8B attention shape (32 query / 8 KV heads, d=128, bf16) at each context
length and batch it times, as CUDA graphs (``bench.kernels.time_call``):

- ``page_scores`` with stats: pages per tile x tiles per program x warps;
- ``topk_pages``: the split kernel's pages per program (power of two) against the
  one-program-per-row kernel (sets ``topk_split.SPLIT_MIN_PAGES``, ``SPLIT_MAX_ROWS``; add
  the ``page_scores`` statistics' cost, the first section, to the split kernel's side);
- ``int4_scores`` with stats: candidates per tile x warps (index mode) and tiles per
  program (range mode);
- ``topp_select`` / ``topp_select_range``: the split kernel's chunk and warps against the
  one-program-per-query-head kernel (sets ``topp_split.SPLIT_MIN_M`` and the rule in
  ``topp_split.split_wanted``).

Prints one line per setting (us per call, and TB/s where the bytes are known), marks the
fastest per shape with ``*``, and writes the best settings as a markdown table. The
choice stays in code: copy the winners into the constants the line names (and the
planning functions ``topp_split.split_plan`` / ``topk_split.split_plan``).

Run from the repository root::

    PYTHONPATH=src python3 scripts/tune_selection_kernels.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch

from nucleus_attn import ops
from nucleus_attn.bench.kernels import LLAMA3_8B, SPREAD, peaked_inputs, time_call
from nucleus_attn.crossover import gpu_label
from nucleus_attn.methods import make_config
from nucleus_attn.methods.twilight import Int4Keys
from nucleus_attn.ops import pages as pg
from nucleus_attn.ops import quant, topk_split, topp_split
from nucleus_attn.span import KeySpan

DEV = torch.device("cuda")
SHAPE = LLAMA3_8B
SCALE = 1.0 / math.sqrt(SHAPE.d)


def timed(label: str, fn: Callable[[], Any], nbytes: float, rows: list[dict],
          **setting: Any) -> None:
    try:
        sec = time_call(fn, DEV, False)
    except Exception as err:  # noqa: BLE001 (a setting that does not compile or fit)
        print(f"  {label} {setting}: failed ({str(err).splitlines()[0][:80]})")
        torch.cuda.synchronize()
        return
    rows.append({"label": label, "seconds": sec, **setting})
    print(f"  {label} {setting}: {sec * 1e6:8.1f} us  {nbytes / sec / 1e12:5.2f} TB/s", flush=True)


def page_inputs(b: int, n: int):
    q, k, v = peaked_inputs(b, SHAPE, n, SPREAD, 0, DEV)
    span = KeySpan.full(b, n, DEV)
    kmin, kmax = ops.page_minmax(k, span, 16)
    return q, k, span, kmin, kmax


def tune_page_scores(b: int, n: int, out: list[dict]) -> None:
    q, _, span, kmin, kmax = page_inputs(b, n)
    nbytes = 2 * kmin.numel() * kmin.element_size() + b * SHAPE.hq * kmin.shape[2] * 4
    saved = (pg.SCORES_BLOCK_P, pg.SCORES_TILES, pg.SCORES_WARPS)
    timed(f"page_scores N={n} B={b} (no stats)", lambda: ops.page_scores(
        q, kmin, kmax, span, 16), nbytes, out, stats=False)
    for bp in (16, 32, 64):
        for tiles in (1, 2, 4, 8):
            for warps in (2, 4, 8):
                pg.SCORES_BLOCK_P, pg.SCORES_TILES, pg.SCORES_WARPS = bp, tiles, warps
                timed(f"page_scores N={n} B={b}", lambda: ops.page_scores(
                    q, kmin, kmax, span, 16, stats=True, scale=SCALE), nbytes, out,
                    SCORES_BLOCK_P=bp, SCORES_TILES=tiles, SCORES_WARPS=warps)
    pg.SCORES_BLOCK_P, pg.SCORES_TILES, pg.SCORES_WARPS = saved


def tune_topk(b: int, n: int, budget: float, out: list[dict]) -> None:
    q, _, span, kmin, kmax = page_inputs(b, n)
    bounds, st = ops.page_scores(q, kmin, kmax, span, 16, stats=True, scale=SCALE)
    k_pages = math.ceil(math.ceil(budget * n) / 16)
    nbytes = bounds.numel() * 4
    label = f"topk_pages N={n} B={b} k={k_pages}"

    def call() -> Any:
        fresh = ops.PageStats(st.chunk, st.scale, st.max, st.min, st.sumexp)
        return ops.topk_pages(bounds, SHAPE.hkv, span, 16, k_pages, 4, 64, SCALE, stats=fresh)

    saved_plan, saved_wanted = topk_split.split_plan, topk_split.split_wanted
    topk_split.split_wanted = lambda *args, **kwargs: False
    timed(label, call, nbytes, out, kernel="row")
    topk_split.split_wanted = lambda *args, **kwargs: True
    for t in (256, 512, 1024, 2048):
        for warps in (4, 8):
            topk_split.split_plan = lambda rows, p, dev, t=t, w=warps: (t, w)
            timed(label, call, nbytes, out, kernel="split", T=t, warps=warps)
    topk_split.split_plan, topk_split.split_wanted = saved_plan, saved_wanted


def int4_inputs(b: int, n: int):
    q, k, _ = peaked_inputs(b, SHAPE, n, SPREAD, 0, DEV)
    keys = Int4Keys.build(k)
    span = KeySpan.full(b, n, DEV)
    cfg = make_config("twilight", p=0.9, dense_below=0)
    kmin, kmax = ops.page_minmax(k, span, 16)
    bounds, st = ops.page_scores(q, kmin, kmax, span, 16, stats=True, scale=SCALE)
    cand, ccnt = ops.topk_pages(bounds, SHAPE.hkv, span, 16,
                                math.ceil(math.ceil(cfg.base_budget * n) / 16), 4, 64, SCALE,
                                stats=st)
    return q, keys, span, cand, ccnt


def tune_int4(b: int, n: int, out: list[dict]) -> None:
    q, keys, span, cand, ccnt = int4_inputs(b, n)
    per = SHAPE.d // 2 + 2 * SHAPE.es
    m = cand.shape[2]
    nbytes = ccnt.sum().item() * (per + 8) + b * SHAPE.hq * m * 4
    saved = (quant.INT4_BLOCK_M, quant.INT4_WARPS, quant.INT4_RANGE_TILES)
    for bm in (64, 128, 256):
        for warps in (2, 4, 8):
            quant.INT4_BLOCK_M, quant.INT4_WARPS = bm, warps
            timed(f"int4_scores N={n} B={b}", lambda: ops.int4_scores(
                q, keys.codes, keys.scale, keys.zero, cand, ccnt, SCALE, stats=True), nbytes,
                out, INT4_BLOCK_M=bm, INT4_WARPS=warps)
    quant.INT4_BLOCK_M, quant.INT4_WARPS = saved[:2]
    nbytes = b * SHAPE.hkv * n * per + b * SHAPE.hq * n * 4
    for tiles in (1, 2, 4, 8):
        quant.INT4_RANGE_TILES = tiles
        timed(f"int4_scores_range N={n} B={b}", lambda: ops.int4_scores_range(
            q, keys.codes, keys.scale, keys.zero, span, SCALE, stats=True), nbytes, out,
            INT4_RANGE_TILES=tiles)
    quant.INT4_BLOCK_M, quant.INT4_WARPS, quant.INT4_RANGE_TILES = saved


def tune_topp(b: int, n: int, out: list[dict]) -> None:
    q, keys, span, cand, ccnt = int4_inputs(b, n)
    est, st = ops.int4_scores(q, keys.codes, keys.scale, keys.zero, cand, ccnt, SCALE, stats=True)
    rng, rst = ops.int4_scores_range(q, keys.codes, keys.scale, keys.zero, span, SCALE,
                                     stats=True)
    saved_plan, saved_wanted = topp_split.split_plan, topp_split.split_wanted
    for mode, x, stt in (("index", est, st), ("range", rng, rst)):
        label = f"topp_select {mode} N={n} B={b} M={x.shape[2]}"
        nbytes = x.numel() * 4 + (cand.numel() * 8 if mode == "index" else 0)

        def call(x=x, stt=stt, mode=mode) -> Any:
            fresh = ops.ScoreStats(stt.chunk, stt.max, stt.sumexp)
            if mode == "index":
                return ops.topp_select(x, cand, ccnt, 0.9, span=span, sink=4, window=64,
                                       stats=fresh)
            return ops.topp_select_range(x, span, SHAPE.hkv, 0.9, sink=4, window=64,
                                         stats=fresh)

        topp_split.split_wanted = lambda *args, **kwargs: False
        timed(label, call, nbytes, out, kernel="row")
        topp_split.split_wanted = lambda *args, **kwargs: True
        for t in (256, 512, 1024, 2048):
            for warps in (4, 8):
                topp_split.split_plan = lambda rows, m, dev, t=t, w=warps: (t, w)
                timed(label, call, nbytes, out, kernel="split", T=t, warps=warps)
        topp_split.split_plan = saved_plan
    topp_split.split_plan, topp_split.split_wanted = saved_plan, saved_wanted


def best_table(rows: list[dict]) -> str:
    lines = ["| kernel and shape | fastest setting | us |", "|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        best = min(mine, key=lambda r: r["seconds"])
        setting = ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("label", "seconds"))
        lines.append(f"| {label} | {setting} | {best['seconds'] * 1e6:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128k at B=1 and 8 only")
    ap.add_argument("--out", default=None, help="markdown file for the table of winners "
                    "(default results/tune_selection_kernels_<gpu>.md)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of: page_scores topk int4 topp")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_selection_kernels needs a CUDA GPU")
        return 2
    points = [(131072, 1), (131072, 8)] if args.quick else [
        (8192, 1), (32768, 1), (131072, 1), (8192, 8), (32768, 8), (131072, 8)]
    only = set(args.only or ("page_scores", "topk", "int4", "topp"))
    rows: list[dict] = []
    for n, b in points:
        print(f"N={n} B={b}", flush=True)
        if "page_scores" in only:
            tune_page_scores(b, n, rows)
        if "topk" in only:
            for budget in (0.01, 0.25):
                tune_topk(b, n, budget, rows)
        if "int4" in only:
            tune_int4(b, n, rows)
        if "topp" in only:
            tune_topp(b, n, rows)
        torch.cuda.empty_cache()
    table = best_table(rows)
    print(table)
    path = args.out or f"results/tune_selection_kernels_{gpu_label(DEV)}.md"
    with open(path, "w") as f:
        f.write(f"# Selection kernel launch settings, {torch.cuda.get_device_name(DEV)}\n\n"
                "Written by scripts/tune_selection_kernels.py (fastest per kernel and "
                "shape; CUDA graphs, median).\n\n" + table + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
