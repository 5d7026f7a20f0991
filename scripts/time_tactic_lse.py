"""Tactic's log-mass kernel in one launch or two (``tactic_select.LSE_TWO_PASS``), timed side
by side on the kernel benchmark's inputs (GPU only): the kernel alone, Tactic's whole
selection and its whole decode step, each as a CUDA graph, plus the sizes of the sampled
clusters that bound the kernel's serial loop, and a check that both variants keep the same
tokens. Run from the repository root:
``PYTHONPATH=src python3 scripts/time_tactic_lse.py [N B [N B ...]]`` (default 131072 1
131072 8).
"""

from __future__ import annotations

import math
import sys

import torch

from nucleus_attn import ops
from nucleus_attn.bench.kernels import LLAMA3_8B, SPREAD, peaked_inputs, time_call
from nucleus_attn.decode import decode_step, new_state
from nucleus_attn.methods import make_config, spec_of
from nucleus_attn.ops import tactic_select
from nucleus_attn.span import KeySpan

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test


def point(n: int, b: int) -> None:
    q, k, v = peaked_inputs(b, LLAMA3_8B, n, SPREAD, 0, DEV)
    scale = 1.0 / math.sqrt(LLAMA3_8B.d)
    span = KeySpan.full(b, n, DEV)
    cfg = make_config("tactic", p=0.9, dense_below=0)
    st = new_state(cfg, k, span)
    spread = st.spread if cfg.spread_rank else None
    labels = st.labels[:, :, :n]
    cap = st.fixed_capacity()
    select = spec_of(cfg).select

    def rank():
        return ops.rank_clusters(q, st.centroids, st.sizes, spread, scale,
                                 head_fraction=cfg.exact_fraction,
                                 sample_positions=cfg.sample_positions,
                                 sample_tokens=cfg.sample_tokens)

    def lse():  # a fresh ranking each call: the kernel after the ranking (both timed)
        return ops.cluster_lse(q, k, rank(), st.members, st.offsets, st.sizes, labels, span,
                               st.ends, cfg.sink, cfg.window, cap, scale)

    masses = lse()
    live = torch.arange(masses.ids.shape[-1], device=DEV) < masses.count[..., None]
    sizes = torch.gather(st.sizes, -1, torch.where(live, masses.ids.long(), 0))
    sampled = sizes[live].float()
    print(f"N={n} B={b}: clusters per row {st.sizes.shape[-1]}, sampled per row "
          f"{masses.count.float().mean().item():.0f}, sampled sizes mean "
          f"{sampled.mean().item():.1f} / max {sampled.max().item():.0f}, "
          f"largest cluster {st.sizes.max().item()}")
    kept = {}
    for two in (False, True):
        tactic_select.LSE_TWO_PASS = two
        t_rank = time_call(rank, DEV, False)
        t_lse = time_call(lse, DEV, False) - t_rank
        t_sel = time_call(lambda: select(q, k, st, span, cfg, scale), DEV, False)
        t_step = time_call(lambda: decode_step(q, k, v, cfg, st, span, scale, padded=False),
                           DEV, False)
        sel = select(q, k, st, span, cfg, scale)
        kept[two] = [sorted(sel.indices[i, h, :int(sel.counts[i, h])].tolist())
                     for i in range(b) for h in range(k.shape[1])]
        print(f"  two_pass={two!s:5}: cluster_lse {t_lse * 1e6:7.1f} us, select "
              f"{t_sel * 1e6:7.1f} us, whole step {t_step * 1e6:7.1f} us")
    print(f"  same kept tokens: {kept[False] == kept[True]}")


if __name__ == "__main__":
    args = [int(x) for x in sys.argv[1:]] or [131072, 1, 131072, 8]
    for i in range(0, len(args), 2):
        point(args[i], args[i + 1])
