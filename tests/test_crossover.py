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
    monkeypatch.setitem(crossover.DENSE_BELOW, "h200", {"quest": 301})
    _, info, _ = _step("quest", 300)
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


def test_table_and_lookup():
    assert crossover.gpu_label(torch.device("cpu")) == "cpu"
    assert crossover.default_dense_below("quest", torch.device("cpu")) == 0
    for gpu, entry in crossover.DENSE_BELOW.items():
        assert gpu in crossover.KNOWN_GPUS
        for method, n in entry.items():
            assert method in methods() and isinstance(n, int) and n >= 0


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
