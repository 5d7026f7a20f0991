"""The command line as a newcomer meets it: flag spellings, help texts that state the code's
defaults, fast rejection of bad input, tables that fit a terminal."""

from __future__ import annotations

import subprocess
import sys


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
