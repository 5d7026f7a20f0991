"""``nucleus-attn bench kernels --quick``: the benchmark's CPU smoke mode (torch backend,
tiny shapes) writes its table, JSON and plot."""

from __future__ import annotations

import json

import pytest
from plot_helpers import saved_figures, visible

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


def table_column(text: str, header: str) -> list[str]:
    """The cells of one column of a rich table printed as text."""
    lines = [ln for ln in text.splitlines() if ln.startswith(("┃", "│"))]
    heads = [c.strip() for c in lines[0].strip("┃").split("┃")]
    i = heads.index(header)
    return [ln.strip("│").split("│")[i].strip() for ln in lines[1:]]


def test_bench_e2e_quick(tmp_path, capsys, monkeypatch):
    """The whole-model benchmark's CPU smoke mode: a tiny random Llama, every row."""
    pytest.importorskip("matplotlib")
    figures = saved_figures(monkeypatch)
    monkeypatch.setenv("COLUMNS", "220")  # the whole table on one line per row
    assert cli.main(["bench", "e2e", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_e2e_cpu.json").read_text())
    assert (tmp_path / "bench_e2e_cpu.png").stat().st_size > 0
    rows = {r["label"]: r for r in data["rows"]}
    assert {"stock sdpa", "dense", "no-attn"} <= set(rows)
    kinds = {r["spec"].split(":")[0] for r in data["rows"] if r["kind"] == "method"}
    assert kinds == {"quest", "twilight", "tactic", "streaming"}
    assert rows["dense"]["speedup"] == 1.0
    for r in data["rows"]:
        assert r["seconds"] > 0 and 0 < r["kept_fraction"] <= 1
        assert r["amdahl_bound"] == rows["dense"]["seconds"] / rows["no-attn"]["seconds"]
        if r["kind"] == "method" and not r["spec"].startswith("streaming"):
            # metadata measured on the tensors is at least the code's own account
            assert r["state_bytes"] >= r["state_accounted_bytes"] > 0
    assert rows["streaming 10.0%"]["kept_fraction"] == pytest.approx(0.1, abs=0.01)
    # a fixed-budget row keeps about what its label says (it kept 30.9% at "10.0%" when
    # the sink and window alone were 23% of the cache)
    assert rows["quest 10.0%"]["kept_fraction"] == pytest.approx(0.1, rel=0.25)
    printed = capsys.readouterr().out
    assert "x dense" in printed
    # "% of bound": a share of the gain in [0, 100], or words (it printed -1287)
    for cell in table_column(printed, "% of bound"):
        assert cell in ("", "-", "slower") or 0 <= int(cell) <= 100, cell
    # the plot: every legend entry visible, one colour per method variant
    (fig,) = figures
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert {ln.get_label() for ln in lines} >= {"twilight 10.0%", "twilight base=quest 10.0%",
                                                "Amdahl bound"}
    assert all(visible(ln) for ln in lines), [ln.get_label() for ln in lines if not visible(ln)]
    colours = [ln.get_color() for ln in lines if ln.get_label() != "Amdahl bound"]
    assert len(set(colours)) == len(colours), colours


def test_bench_memory_quick(tmp_path):
    assert cli.main(["bench", "memory", "--quick", "--out", str(tmp_path),
                     "--methods", "dense", "twilight:p=0.9"]) == 0
    runs = json.loads((tmp_path / "bench_memory_cpu.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["dense", "twilight:p=0.9"]
    for r in runs:
        assert r["kv_cache_bytes"] == r["kv_cache_accounted"]
    assert runs[1]["state_bytes"] >= runs[1]["accounting"]["metadata_bytes"] > 0


def test_bench_needs_a_gpu_without_quick(capsys, tmp_path, monkeypatch):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: the full benchmark would run")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "e2e"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # refused before making its output folder
