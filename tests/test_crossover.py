"""The crossover rule: a decode step with a cache shorter than ``dense_below`` is dense
attention, at the stated length and not one token later; the per-GPU default table applies
outside diagnostics mode and an explicit value always wins."""

from __future__ import annotations

import math

import pytest
import torch

import nucleus_attn as na
from nucleus_attn import crossover, ops
from nucleus_attn.decode import decode_step, new_state
from nucleus_attn.methods import describe, make_config, methods, parse_method
from nucleus_attn.span import KeySpan

SPARSE = {"quest": {"budget": 32}, "twilight": {"p": 0.5, "base_budget": 64},
          "tactic": {"p": 0.5}, "streaming": {"sink": 4, "window": 16},
          "oracle-topk": {"budget": 16}, "oracle-topp": {"p": 0.5}}


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 32, generator=g) * 3
    k = torch.randn(2, 2, n, 32, generator=g)
    v = torch.randn(2, 2, n, 32, generator=g)
    return q, k, v


def _step(method: str, n: int, diagnostics: bool = False, **params):
    q, k, v = _inputs(n)
    cfg = make_config(method, **SPARSE.get(method, {}), **params)
    span = KeySpan.full(2, n)
    state = new_state(cfg, k, span)
    out, info = decode_step(q, k, v, cfg, state, span, 1 / math.sqrt(32), padded=False,
                            diagnostics=diagnostics)
    dense = ops.dense_attention(q, k, v, None, 1 / math.sqrt(32))
    return out, info, dense


def test_every_sparse_method_has_a_case():
    assert set(SPARSE) | {"dense"} == set(methods())


@pytest.mark.parametrize("method", list(SPARSE))
def test_rule_switches_at_the_stated_length(method):
    n = 300
    out, info, dense = _step(method, n, dense_below=n + 1)  # N < dense_below: dense
    assert info.indices is None and torch.equal(info.kept, info.lengths[:, None].expand(2, 2))
    torch.testing.assert_close(out, dense)
    out, info, _ = _step(method, n, dense_below=n)  # N == dense_below: the method selects
    assert info.indices is not None and (info.kept < n).any()
    out, info, _ = _step(method, n, dense_below=0)  # 0: never dense
    assert info.indices is not None


def test_default_table_applies_per_gpu_outside_diagnostics(monkeypatch):
    monkeypatch.setattr(crossover, "gpu_label", lambda device: "h200")
    monkeypatch.setitem(crossover.DENSE_BELOW, "h200", {"quest": {1: 301, 4: 2}})
    _, info, _ = _step("quest", 300)  # B=2: the entry of batch 1
    assert info.indices is None, "below the table's length the step must be dense"
    _, info, _ = _step("quest", 301)
    assert info.indices is not None, "at the table's length the method must select"
    _, info, _ = _step("quest", 300, diagnostics=True)
    assert info.indices is not None, "diagnostics mode runs the method as configured"
    _, info, _ = _step("quest", 300, dense_below=0)
    assert info.indices is not None, "an explicit dense_below=0 overrides the table"
    _, info, _ = _step("twilight", 300)
    assert info.indices is not None, "a method without an entry has no crossover"
    monkeypatch.setattr(crossover, "gpu_label", lambda device: "a10g")
    _, info, _ = _step("quest", 300)
    assert info.indices is not None, "a GPU without an entry has no crossover"


def test_table_and_lookup(monkeypatch):
    cpu = torch.device("cpu")
    assert crossover.gpu_label(cpu) == "cpu"
    assert crossover.default_dense_below("quest", cpu) == 0
    for gpu, entry in crossover.DENSE_BELOW.items():
        assert gpu in crossover.KNOWN_GPUS
        for key, n in entry.items():
            name, _, cond = key.partition(":")
            assert name in methods(), key
            if cond:  # a field of the method's config
                assert cond.partition("=")[0] in vars(make_config(name)), key
            for v in (n.values() if isinstance(n, dict) else [n]):
                assert isinstance(v, int) and v >= 0
    monkeypatch.setattr(crossover, "gpu_label", lambda device: "h200")
    monkeypatch.setitem(crossover.DENSE_BELOW, "h200", {
        "twilight": {1: 1000, 8: 100}, "twilight:base=dense": 5000})
    tw, twd = make_config("twilight", base="quest"), make_config("twilight", base="dense")
    # a batch takes the largest listed batch at or below it; a field qualifier wins
    assert [crossover.default_dense_below(tw, cpu, bb) for bb in (1, 7, 8, 32)] == [
        1000, 1000, 100, 100]
    assert crossover.default_dense_below(twd, cpu, 8) == 5000


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4k"])
def test_dense_below_is_validated(bad):
    for method in methods():
        with pytest.raises(ValueError, match=r"dense_below=.* must be None"):
            make_config(method, dense_below=bad)


def test_dense_below_is_a_keyword_on_every_config():
    assert na.Quest(2048).budget == 2048  # positional fields are unchanged
    cfg = parse_method("twilight:p=0.9,dense_below=8192")
    assert cfg.dense_below == 8192 and "dense_below=8192" in describe(cfg)
    assert cfg.replace(dense_below=None).dense_below is None
