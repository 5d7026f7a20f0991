"""Where the split selection kernels spend their time: each phase, with and without its
last-program tail, timed as CUDA graphs (GPU only).

A phase k is timed as the graph [reset counters, phases 1..k] minus [reset, phases 1..k-1];
its tail is left out by setting the phase's ticket so that no program draws the last one.
Also prints the per-head survivor counts the top-p tail bisects. Run from the repository
root: ``PYTHONPATH=src python3 scripts/time_selection_phases.py [N B]``.
"""

from __future__ import annotations

import math
import sys

import torch

from nucleus_attn import ops
from nucleus_attn.bench.kernels import LLAMA3_8B, SPREAD, peaked_inputs, time_call
from nucleus_attn.decode import new_state
from nucleus_attn.methods import make_config
from nucleus_attn.ops import topk_split, topp_split
from nucleus_attn.span import KeySpan

DEV = torch.device("cuda")


def graph_time(steps: list) -> float:
    def run() -> None:
        for s in steps:
            s()
    return time_call(run, DEV, False)


def phases(label: str, launch, n_phases: int, tickets: torch.Tensor) -> None:
    """tickets: [rows, n] int32 view of the counters (column k-1 is phase k's ticket); the
    whole zeroed workspace is reset before each sequence."""
    reset = launch.workspace.zero_
    base = graph_time([reset])
    prev = base
    for k in range(1, n_phases + 1):
        seq = [reset] + [lambda j=j: launch(j) for j in range(1, k + 1)]
        full = graph_time(seq)
        line = f"  {label} phase {k}: {(full - prev) * 1e6:7.1f} us"
        if k <= n_phases - 1:  # phases with a tail
            col = k - 1
            skip = [reset] + [lambda j=j: launch(j) for j in range(1, k)] + [
                lambda col=col: tickets[:, col].fill_(-(1 << 30)), lambda k=k: launch(k)]
            ref = [reset] + [lambda j=j: launch(j) for j in range(1, k)] + [
                lambda col=col: tickets[:, col].fill_(0), lambda k=k: launch(k)]
            t_skip, t_ref = graph_time(skip), graph_time(ref)
            line += f"   (tail {(t_ref - t_skip) * 1e6:6.1f} us)"
        print(line, flush=True)
        prev = full


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    b = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    shape = LLAMA3_8B
    scale = 1 / math.sqrt(shape.d)
    q, k, v = peaked_inputs(b, shape, n, SPREAD, 0, DEV)
    span = KeySpan.full(b, n, DEV)
    cfg = make_config("twilight", p=0.9, dense_below=0)
    st = new_state(cfg, k, span)
    pg, keys = st.pages, st.keys
    bounds, pst = ops.page_scores(q, pg.kmin[:, :, :pg.pages], pg.kmax[:, :, :pg.pages], span,
                                  16, stats=True, scale=scale)
    rows = b * shape.hkv
    for k_pages in (82, 2048):
        launch, _, _ = topk_split.prepare(bounds, shape.hkv, span, 16, k_pages, 4, 64, scale,
                                          pst.max, pst.min, pst.sumexp, None,
                                          ops.pages.topk_pages_capacity(pg.pages, 16, k_pages, 4,
                                                                        64))
        ws = launch.workspace.view(rows, topk_split.WORKSPACE_PER_ROW)
        print(f"topk N={n} B={b} k={k_pages} plan={topk_split.split_plan(rows, pg.pages, DEV)}")
        phases("topk", launch, 2, ws[:, topk_split.NBK + 1:topk_split.NBK + 3])
    cand, ccnt = ops.topk_pages(bounds, shape.hkv, span, 16, 2048, 4, 64, scale)
    est, sst = ops.int4_scores(q, keys.codes, keys.scale, keys.zero, cand, ccnt, scale,
                               stats=True)
    rng, rst = ops.int4_scores_range(q, keys.codes, keys.scale, keys.zero, span, scale,
                                     stats=True)
    for mode, x, s_ in (("index", est, sst), ("range", rng, rst)):
        kw = {"indices": cand, "counts": ccnt} if mode == "index" else {}
        launch, kept, kc = topp_split.prepare(x, shape.hkv, 0.9, s_.max, s_.sumexp, None,
                                              span=span, sink=4, window=64, **kw)
        ws = launch.workspace.view(rows, -1)[:, :topp_split.TICKETS]
        print(f"topp {mode} N={n} B={b} M={x.shape[2]} "
              f"plan={topp_split.split_plan(rows, x.shape[2], DEV)}")
        phases(f"topp {mode}", launch, 4, ws)
        par = launch.scratch[launch.offsets["par"]:].view(-1)[:rows * 4 * 16].view(rows, 4, 16)
        slot = {name: int(getattr(getattr(topp_split, name), "value", 0))
                for name in ("P_CNT", "P_BF", "P_BL")}
        print(f"  survivors per head (first rows): {par[:4, :, slot['P_CNT']].tolist()}")
        print(f"  coarse brackets: {par[:2, :, slot['P_BF']].tolist()} .. "
              f"{par[:2, :, slot['P_BL']].tolist()}; kept {kc.sum().item()}")


if __name__ == "__main__":
    main()
