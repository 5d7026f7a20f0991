"""Argument helpers shared by the subcommands (``compare``, ``demo``, ``eval``, ``bench``).

Why: each subcommand used to spell its method flag its own way (``demo --method A
--method B``, the others ``--methods A B``). The spelling documented everywhere is
``--methods A B``; ``--method A`` (repeatable) is accepted as the same flag, so that
either habit works.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_methods_argument(parser: argparse.ArgumentParser, *, help: str,
                         metavar: str = "SPEC", choices: Any = None) -> None:
    """``--methods A B ...`` (documented) and ``--method A`` (an alias, repeatable), both
    extending ``args.methods``, which is None when neither is given (the caller's
    default applies)."""
    parser.add_argument("--methods", nargs="+", action="extend", dest="methods",
                        default=None, metavar=metavar, choices=choices, help=help)
    parser.add_argument("--method", nargs="+", action="extend", dest="methods",
                        metavar=metavar, choices=choices, help=argparse.SUPPRESS)
