"""``nucleus-attn bench TARGET``: ``kernels`` (one decode-attention call per method, CUDA-graph
captured, against dense SDPA and the byte floor), ``e2e`` (a whole Llama-3-8B-shaped
model's decode step per method, against our dense step, the Amdahl bound and the floor),
``generate`` (``model.generate()`` per method, eager and compiled: first step, steady
ms/token, tokens/s), ``memory`` (a long generation per method: allocations next to the
cache's account, per-token time) and ``host`` (the host work of an eager decode step per
layer and method: ops, Triton launches, syncs, kernel specialisations; runs on a CPU).

Results go to ``nucleus-attn-results/bench/`` unless ``--out`` names another folder (see
:mod:`nucleus_attn.outdir`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cliargs import add_methods_argument
from ..outdir import claim, default_out

TARGETS = ("kernels", "e2e", "memory", "generate", "host")
#: Targets that build a transformers model.
NEEDS_TRANSFORMERS = ("e2e", "memory", "generate", "host")
#: Targets that need a CUDA GPU unless ``--quick``.
NEEDS_GPU = ("kernels", "e2e", "memory", "generate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=TARGETS,
                        help="kernels: per-call decode attention per method; e2e: per-token "
                        "decode of a whole model per method; generate: model.generate() per "
                        "method, eager and compiled; memory: allocations and per-token time "
                        "of a long generation per method; host: host work per eager decode "
                        "step and layer (CPU)")
    parser.add_argument("--out", type=Path, default=default_out("bench"),
                        help=f"folder for the JSON and PNG (default {default_out('bench')}/; "
                        "a folder another command wrote is refused)")
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
    add_methods_argument(parser, metavar="METHOD",
                         help="rows to run (kernels: dense sparse quest twilight tactic; e2e: "
                         "quest twilight tactic streaming; default all; the dense baselines "
                         "always run)")
    parser.add_argument("--steps", type=int, default=None,
                        help="e2e: timed decode steps per row (default 20); memory: tokens "
                        "generated (default 10000); generate: new tokens per generation "
                        "(default 48); host: counted decode steps (default 8)")
    parser.add_argument("--modes", nargs="+", default=None, choices=("eager", "compiled"),
                        help="generate, memory: eager (dynamic cache) and/or compiled (static "
                        "cache, torch.compile + CUDA graphs); default generate: both (--quick: "
                        "eager), memory: eager")
    parser.add_argument("--repeats", type=int, default=None,
                        help="generate: interleaved timed runs per row (default 2)")
    parser.add_argument("--prompt", type=int, default=None,
                        help="host: cached tokens before the counted steps (default 2030: "
                        "the growth crosses N=2048); memory: prompt tokens (default 2048)")
    parser.add_argument("--compile", action="store_true",
                        help="e2e: the lean step: the whole forward under torch.compile "
                        "(fullgraph; our attention one opaque op per layer), every row alike")
    parser.add_argument("--compile-parts", action="store_true",
                        help="e2e: torch.compile only the norms, rotary embedding and MLP")
    parser.add_argument("--profile", type=int, nargs=2, default=None, metavar=("N", "B"),
                        help="kernels: also time each stage of quest/twilight/tactic alone "
                        "at N, B; e2e: per-kernel GPU time of one step per row at N, B")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..extras import missing, require

    if args.target in NEEDS_GPU and not args.quick and not torch.cuda.is_available():
        print(f"nucleus-attn bench {args.target} needs a CUDA GPU; use --quick for a CPU "
              "smoke test")
        return 2
    if args.target in NEEDS_TRANSFORMERS:
        require(f"bench {args.target}", "transformers")
    if args.target == "kernels":
        from .kernels import ROW_METHODS

        unknown = sorted(set(args.methods or ()) - set(ROW_METHODS))
        if unknown:
            raise ValueError(f"bench kernels: unknown --methods {unknown}; choose from "
                             f"{list(ROW_METHODS)}")
    out = claim(args.out, "bench")
    print(f"results: {out.resolve()}")
    if missing("matplotlib"):
        print("matplotlib is not installed: JSON only, no plot (pip install "
              "'nucleus-attn[plot]')")
    args.out = str(out)
    if args.target == "generate":
        from .generate import main as generate_main

        return generate_main(out=args.out, quick=args.quick, ns=args.n, methods=args.methods,
                             modes=args.modes, new_tokens=args.steps, repeats=args.repeats,
                             seed=args.seed)
    if args.target == "host":
        from .host import main as host_main

        return host_main(out=args.out, quick=args.quick, methods=args.methods,
                         prompt=args.prompt, steps=args.steps, seed=args.seed)
    if args.target == "memory":
        from .memory import main as memory_main

        return memory_main(out=args.out, quick=args.quick, steps=args.steps or 10000,
                           methods=args.methods, seed=args.seed, modes=args.modes,
                           prompt_tokens=args.prompt or 2048)
    if args.target == "e2e":
        from .e2e import main as e2e_main

        return e2e_main(out=args.out, quick=args.quick, ns=args.n, batches=args.batch,
                        fractions=args.fractions, methods=args.methods, steps=args.steps or 20,
                        compile="whole" if args.compile else
                        ("parts" if args.compile_parts else False), seed=args.seed,
                        profile=tuple(args.profile) if args.profile else None)
    from .kernels import main

    return main(out=args.out, quick=args.quick, ns=args.n, batches=args.batch,
                fractions=args.fractions, seed=args.seed,
                profile=tuple(args.profile) if args.profile else None, methods=args.methods)
