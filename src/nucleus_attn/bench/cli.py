"""``nucleus-attn bench TARGET``: ``kernels`` (one decode-attention call per method, CUDA-graph
captured, against dense SDPA and the byte floor), ``e2e`` (a whole Llama-3-8B-shaped
model's decode step per method, against our dense step, the Amdahl bound and the floor)
and ``memory`` (a long generation per method: allocations next to the cache's account)."""

from __future__ import annotations

import argparse

TARGETS = ("kernels", "e2e", "memory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=TARGETS,
                        help="kernels: per-call decode attention per method; e2e: per-token "
                        "decode of a whole model per method; memory: allocations of a long "
                        "generation per method")
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG "
                        "(default results/)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes on the torch backend (a CPU smoke test)")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="context lengths (default kernels: 4096 8192 32768 131072; "
                        "e2e: 4096 32768 131072)")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch sizes (default kernels: 1 8 32; e2e: 1 4 8)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="kept fractions of the fixed-budget rows (default kernels: 0.01 "
                        "0.02 0.05 0.1; e2e: 0.01 0.02 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="rows to run (kernels: dense sparse quest twilight tactic; e2e: "
                        "quest twilight tactic streaming; default all; the dense baselines "
                        "always run)")
    parser.add_argument("--steps", type=int, default=None,
                        help="e2e: timed decode steps per row (default 20); memory: tokens "
                        "generated (default 10000)")
    parser.add_argument("--compile", action="store_true",
                        help="e2e: torch.compile the norms, rotary embedding and MLP first")
    parser.add_argument("--profile", type=int, nargs=2, default=None, metavar=("N", "B"),
                        help="kernels: also time each stage of quest/twilight/tactic alone "
                        "at N, B; e2e: per-kernel GPU time of one step per row at N, B")


def run(args: argparse.Namespace) -> int:
    if args.target == "memory":
        from .memory import main as memory_main

        return memory_main(out=args.out, quick=args.quick, steps=args.steps or 10000,
                           methods=args.methods, seed=args.seed)
    if args.target == "e2e":
        from .e2e import main as e2e_main

        return e2e_main(out=args.out, quick=args.quick, ns=args.n, batches=args.batch,
                        fractions=args.fractions, methods=args.methods, steps=args.steps or 20,
                        compile_model=args.compile, seed=args.seed,
                        profile=tuple(args.profile) if args.profile else None)
    from .kernels import ROW_METHODS, main

    unknown = sorted(set(args.methods or ()) - set(ROW_METHODS))
    if unknown:
        print(f"bench kernels: unknown --methods {unknown}; choose from {list(ROW_METHODS)}")
        return 2

    return main(out=args.out, quick=args.quick, ns=args.n, batches=args.batch,
                fractions=args.fractions, seed=args.seed,
                profile=tuple(args.profile) if args.profile else None, methods=args.methods)
