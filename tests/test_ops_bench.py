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


def test_bench_e2e_quick(tmp_path, capsys):
    """The whole-model benchmark's CPU smoke mode: a tiny random Llama, every row."""
    pytest.importorskip("matplotlib")
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
    assert "x dense" in capsys.readouterr().out


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
