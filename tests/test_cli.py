"""The command line as a newcomer meets it: flag spellings, help texts that state the code's
defaults, fast rejection of bad input, tables that fit a terminal."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from nucleus_attn import describe, make_config
from nucleus_attn.cli import build_parser


@pytest.mark.parametrize("command", ["compare", "demo", "eval", "bench"])
def test_one_documented_spelling_of_the_methods_flag(command):
    """--methods A B everywhere; --method A (repeated) is accepted as the same flag."""
    parse = build_parser(command).parse_args
    head = [command, "kernels"] if command == "bench" else [command]
    a, b = ("dense", "quest") if command == "bench" else ("dense", "quest:budget=64")
    assert parse([*head, "--methods", a, b]).methods == [a, b]
    assert parse([*head, "--method", a, "--method", b]).methods == [a, b]
    assert parse(head).methods is None  # the command's own default applies
    sub = build_parser(command)._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    assert "--methods" in text and "--method " not in text


def test_generate_takes_one_method_under_either_spelling():
    parse = build_parser("generate").parse_args
    assert parse(["generate", "--prompt", "x", "--methods", "quest"]).method == "quest"
    assert parse(["generate", "--prompt", "x"]).method == "twilight"


def test_generate_help_states_the_code_default():
    sub = build_parser("generate")._subparsers._group_actions[0].choices["generate"]
    help_text = " ".join(sub.format_help().split())
    default = describe(make_config("twilight"))
    assert default == "twilight:p=0.9"
    assert f"(default {default};" in help_text


def test_a_bad_method_spec_is_rejected_before_transformers_is_imported():
    """`generate --method twilight:p` took 20 s (transformers' import) to say "'p' has no
    key"; now it names the fix and loads nothing."""
    code = ("import sys\n"
            "from nucleus_attn.cli import main\n"
            "rc = main(['generate', '--prompt', 'x', '--method', 'twilight:p'])\n"
            "assert rc == 2, rc\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "p has no value; write p=VALUE, e.g. twilight:p=0.9" in done.stderr


def test_per_layer_table_fits_80_columns():
    """`generate --per-layer` cut its columns ("190/2…") at a pipe's 80 characters."""
    from rich.console import Console

    from nucleus_attn.integrations.stats import print_summary

    def layer(i: int, kind: str) -> dict:
        return {"layer": i, "kind": kind, "mean_kept_fraction": 0.0931, "std_kept_fraction":
                0.0412, "kept_fraction_per_head": [0.051, 0.204], "mass_per_head": [0.95, 0.91],
                "mean_kept_tokens": 12190.0, "mean_context_tokens": 131072.0, "mean_mass": 0.953}

    summary = {"spec": "twilight:p=0.9", "method": "twilight", "decode_rows": 16,
               "per_layer": [layer(0, "dense"), layer(1, "sparse")],
               "mean_kept_fraction": 0.5, "sparse_kept_fraction": 0.09, "mean_kept_tokens":
               12190.0, "mean_context_tokens": 131072.0, "mean_mass": 0.95}
    console = Console(width=80, record=True, file=io.StringIO())
    print_summary(summary, console)
    text = console.export_text()
    assert "…" not in text
    rows = [ln for ln in text.splitlines() if "12190/131072" in ln]
    assert len(rows) == 2 and all("9.3%" in r and "0.953" in r and "0.910" in r
                                  and "5.1%-20.4%" in r for r in rows), text
