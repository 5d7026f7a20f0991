"""``nucleus-attn bench kernels --quick``: the benchmark's CPU smoke mode (torch backend,
tiny shapes) writes its table, JSON and plot."""

from __future__ import annotations

import json

import pytest

from nucleus_attn import cli


def test_bench_kernels_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "kernels", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_kernels_cpu.json").read_text())
    assert (tmp_path / "bench_kernels_cpu.png").stat().st_size > 0
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"sdpa", "dense", "sparse", "quest", "twilight", "tactic"}
    for r in data["rows"]:
        assert r["seconds"] > 0 and 0 < r["kept_fraction"] <= 1 and r["speedup"] > 0
    assert "x SDPA" in capsys.readouterr().out


def test_bench_e2e_is_not_there_yet(capsys):
    assert cli.main(["bench", "e2e"]) == 2
    assert "not implemented yet" in capsys.readouterr().out
