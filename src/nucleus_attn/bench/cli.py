"""``nucleus-attn bench TARGET``: ``kernels`` (one decode-attention call per method, CUDA-graph
captured, against dense SDPA and the byte floor). ``e2e`` (whole-model decode) comes later."""

from __future__ import annotations

import argparse

TARGETS = ("kernels", "e2e")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=TARGETS,
                        help="kernels: per-call decode attention per method; e2e: not yet")
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG "
                        "(default results/)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes on the torch backend (a CPU smoke test)")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="context lengths (default 4096 8192 32768 131072)")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch sizes (default 1 8 32)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="kept fractions of the fixed-budget rows (default 0.01 0.02 0.05 "
                        "0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=("dense", "sparse", "quest", "twilight", "tactic"),
                        help="rows to run (default all; SDPA always runs)")
    parser.add_argument("--profile", type=int, nargs=2, default=None, metavar=("N", "B"),
                        help="also time each stage of quest/twilight/tactic alone at N, B")


def run(args: argparse.Namespace) -> int:
    if args.target == "e2e":
        print("nucleus-attn bench e2e: not implemented yet; use `bench kernels`")
        return 2
    from .kernels import main

    return main(out=args.out, quick=args.quick, ns=args.n, batches=args.batch,
                fractions=args.fractions, seed=args.seed,
                profile=tuple(args.profile) if args.profile else None, methods=args.methods)
