"""Twilight's decode step on the kernel benchmark's inputs (GPU): checks, then times.

Checks, per point: the int4 estimates kernel equals its torch reference (run on the same
GPU tensors), the binned top-p kernels keep the reference's tokens, and the kept sets
meet the top-p contract against the exact nucleus (mass >= p per query head, at most 2%
more tokens than the union of the exact nuclei plus 16 per KV head).

Times (CUDA graphs, ``triton.testing.do_bench`` medians) side by side with the best dense
SDPA of the run: the estimates kernel in each launch setting of ``VARIANTS``, the
selection (estimates + top-p), the whole step of Twilight (dense base, p 0.9 / 0.95; Quest
base p 0.9), the sparse attention over Twilight's kept set in each of ``ATTENTION``, and
prints every kernel of one eager step with its GPU time.

Run from the repository root: ``PYTHONPATH=src python3 scripts/time_twilight_step.py
[N B [N B ...]]`` (default 131072 1 131072 8).
"""

from __future__ import annotations

import math
import sys

import torch

from nucleus_attn import ops
from nucleus_attn.bench.kernels import (
    LLAMA3_8B,
    SPREAD,
    best_sdpa,
    kernel_launches,
    peaked_inputs,
    time_call,
)
from nucleus_attn.decode import decode_step, new_state
from nucleus_attn.methods import make_config
from nucleus_attn.ops import attention, quant, topp_binned
from nucleus_attn.span import KeySpan

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# estimates kernel: (tile, warps, pipelining stages)
VARIANTS = [(64, 4, 3), (64, 2, 3), (32, 4, 3), (64, 4, 4)]
# sparse attention: (tile, warps, programs per SM, pipelining stages)
ATTENTION = [(64, 4, 32, 3), (64, 4, 4, 3), (64, 4, 2, 3)]
CHUNKS = [1024, 512, 2048]  # candidates per program of the selection (the first is kept)


def contract(est: ops.Estimates, kept: torch.Tensor, kcnt: torch.Tensor, p: float,
             sink: int, window: int) -> str:
    """Kept mass per query head and size against the exact nucleus (float64)."""
    b, hkv, m, g = est.values.shape
    logits = est.head_major().double()
    pos = est.positions()
    mask = ops.indices_to_mask(kept, kcnt, est.span.n)
    kept_slot = mask.gather(-1, pos)
    w = torch.softmax(logits, -1).nan_to_num(0.0)
    mass = (w * kept_slot.repeat_interleave(g, 1)).sum(-1)
    cnt = est.live().sum(-1)
    nkept, ncnt = ops.topp_nucleus(logits.float(), pos, cnt, p, span=est.span, sink=sink,
                                   window=window)
    nmask = ops.indices_to_mask(nkept, ncnt, est.span.n)
    extra = (mask.sum(-1) - nmask.sum(-1)).float()
    limit = 0.02 * nmask.sum(-1).float() + 16
    ok = bool((mass >= p - 1e-5).all()) and bool((extra <= limit).all())
    return (f"contract {'ok' if ok else 'VIOLATED'}: min mass {mass.min().item():.4f}, "
            f"kept/nucleus {mask.sum().item() / max(1, nmask.sum().item()):.4f}")


def point(n: int, b: int) -> list[tuple[str, float]]:
    q, k, v = peaked_inputs(b, LLAMA3_8B, n, SPREAD, 0, DEV)
    scale = 1.0 / math.sqrt(LLAMA3_8B.d)
    span = KeySpan.full(b, n, DEV)
    rows: list[tuple[str, float]] = []
    name, sdpa = best_sdpa(q, k, v, scale, DEV, False)
    rows.append((f"sdpa ({name})", sdpa))
    cfg = make_config("twilight", p=0.9, dense_below=0)
    st = new_state(cfg, k, span)
    keys = st.keys

    def est_call(impl: str = "auto"):
        return ops.int4_estimates(q, keys.codes, keys.scale, keys.zero, scale, span=span,
                                  impl=impl)

    # checks
    et, er = est_call(), est_call("torch")
    live = et.live()[..., None].expand_as(et.values)
    bad = (et.values != er.values)[live].sum().item()
    kt, ct = ops.topp_select_estimates(et, 0.9, sink=4, window=64)
    kr, cr = ops.topp_select_estimates(et, 0.9, sink=4, window=64, impl="torch")
    sym = (ops.indices_to_mask(kt, ct, n) ^ ops.indices_to_mask(kr, cr, n)).sum().item()
    print(f"N={n} B={b}: estimates differing from the reference: {bad} of {live.sum().item()}; "
          f"kept {ct.sum().item()} vs reference {cr.sum().item()} (symmetric difference "
          f"{sym}); {contract(et, kt, ct, 0.9, 4, 64)}", flush=True)
    # the estimates kernel per launch setting
    for block, warps, stages in VARIANTS:
        quant.INT4_BLOCK_M, quant.INT4_WARPS, quant.INT4_STAGES = block, warps, stages
        rows.append((f"int4_estimates tile {block} warps {warps} stages {stages}",
                     time_call(est_call, DEV, False)))
    best = min((r for r in rows if r[0].startswith("int4")), key=lambda r: r[1])[0].split()
    quant.INT4_BLOCK_M, quant.INT4_WARPS, quant.INT4_STAGES = (int(best[i]) for i in (2, 4, 6))

    def selection():
        return ops.topp_select_estimates(est_call(), 0.9, sink=4, window=64)

    for chunk in CHUNKS:
        topp_binned.CHUNK = chunk
        rows.append((f"estimates + top-p, chunks of {chunk}", time_call(selection, DEV, False)))
        rows.append((f"twilight p=0.9, chunks of {chunk}", time_call(
            lambda: decode_step(q, k, v, cfg, st, span, scale, padded=False), DEV, False)))
    topp_binned.CHUNK = CHUNKS[0]
    for label, params in (("twilight p=0.9", {"p": 0.9}), ("twilight p=0.95", {"p": 0.95}),
                          ("twilight p=0.9 base=quest", {"p": 0.9, "base": "quest"})):
        c2 = make_config("twilight", dense_below=0, **params)
        s2 = st if params.get("base") is None else new_state(c2, k, span)
        _, info = decode_step(q, k, v, c2, s2, span, scale, padded=False)
        frac = info.kept.sum().item() / (b * k.shape[1] * n)
        sec = time_call(lambda c2=c2, s2=s2: decode_step(q, k, v, c2, s2, span, scale,
                                                         padded=False), DEV, False)
        rows.append((f"{label} (kept {frac * 100:.2f}%)", sec))
    knobs = ("BLOCK_N", "SPLIT_WARPS", "PROGRAMS_PER_SM", "STAGES")
    default = [getattr(attention, kn) for kn in knobs]
    for setting in ATTENTION:
        for kn, val in zip(knobs, setting, strict=True):
            setattr(attention, kn, val)
        rows.append(("attention tile {} warps {} {}/SM stages {}".format(*setting),
                     time_call(lambda: ops.sparse_attention(q, k, v, kt, ct, scale), DEV, False)))
    for kn, val in zip(knobs, default, strict=True):
        setattr(attention, kn, val)
    if DEV.type == "cuda":
        kernel_launches(f"twilight N={n} B={b}",
                        lambda: decode_step(q, k, v, cfg, st, span, scale, padded=False))
    print(f"\nN={n} B={b} (best SDPA {sdpa * 1e6:.1f} us)")
    for label, sec in rows:
        print(f"  {label:<44} {sec * 1e6:9.1f} us  {sdpa / sec:6.2f}x SDPA")
    return rows


def main() -> None:
    args = [int(a) for a in sys.argv[1:]] or [131072, 1, 131072, 8]
    for n, b in zip(args[::2], args[1::2], strict=True):
        point(n, b)
        torch.cuda.empty_cache() if DEV.type == "cuda" else None


if __name__ == "__main__":
    main()
