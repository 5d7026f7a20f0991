"""``nucleus-attn``: compare | generate | demo | eval | bench.

Each subcommand lives in the module that does its work, which exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up, importing
a module when its subcommand runs (so ``nucleus-attn compare`` needs no transformers).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("nucleus_attn.compare", "method comparison on synthetic peaked attention"),
    "generate": ("nucleus_attn.generate", "generate text with a sparse method on a HF model"),
    "demo": ("nucleus_attn.demo", "long-context retrieval on the bundled model, per method"),
    "eval": ("nucleus_attn.eval.cli", "offline long-context accuracy and perplexity sweeps"),
    "bench": ("nucleus_attn.bench.cli", "benchmarks: kernels, e2e, generate, memory (GPU), host"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="nucleus-attn",
        description="Adaptive top-p sparse decode attention for long-context LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == command:
            _add_arguments(p, module)
    return parser


def _add_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        # An optional dependency (transformers, matplotlib) is missing: the subcommand
        # reports it when it runs, the others stay usable.
        parser.set_defaults(_import_error=str(err))
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    mod.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_import_error", None):
        print(
            f"nucleus-attn {args.command}: {args._import_error}\n"
            "install the extras it needs: pip install 'nucleus-attn[hf,plot]'",
            file=sys.stderr,
        )
        return 1
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # user errors (bad method name, missing model, missing extra) read as one line
        print(f"nucleus-attn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
