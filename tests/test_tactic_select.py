"""Tactic's selection kernels (ranking bins, cluster log-masses, the cut, the kept list)
against their torch references and float64 in Triton's interpreter, on awkward shapes:
GQA 1/3/4/8, ragged spans, clusters of one token, a single cluster, decode tokens
appended after clustering."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import interpreter
from tactic_helpers import (
    check_append_clusters,
    check_cluster_lse,
    check_rank_clusters,
    check_select,
    check_tactic_cut,
    make_case,
)

from nucleus_attn.ops import tactic_select as ts

pytestmark = pytest.mark.usefixtures(interpreter.__name__)

# (B, Hq, Hkv, N, d, ragged, appended, method parameters); "diffuse" cases have flat
# attention, whose cut falls past the exactly scored head
CASES = {
    "diffuse-gqa4-ragged": (2, 8, 2, 900, 64, True, 0, {"diffuse": True}),
    "diffuse-gqa1-appended": (1, 2, 2, 500, 64, False, 25, {"diffuse": True, "p": 0.6}),
    "gqa4-ragged": (2, 8, 2, 700, 64, True, 0, {}),
    "gqa3": (1, 3, 1, 97, 128, False, 0, {"segment": 64}),
    "gqa1-appended": (2, 4, 4, 300, 64, False, 30, {}),
    "gqa8-appended-ragged": (1, 8, 1, 1000, 64, True, 40, {"p": 0.75}),
    "size1-clusters": (1, 4, 2, 60, 64, False, 0, {"cluster_size": 1, "window": 8}),
    "single-cluster": (2, 4, 1, 12, 64, False, 0, {"cluster_size": 16, "sink": 1, "window": 2}),
    "paper-ranking": (1, 8, 2, 400, 64, False, 0, {"outliers": 0, "spread_rank": False}),
}


def case(name: str, dtype=torch.float32):
    b, hq, hkv, n, d, ragged, appended, params = CASES[name]
    return make_case("cpu", b, hq, hkv, n, d, dtype, seed=n + hq, ragged=ragged,
                     appended=appended, **params)


@pytest.mark.parametrize("name", list(CASES))
def test_rank_clusters(name):
    check_rank_clusters(case(name))


@pytest.mark.parametrize("two_pass", [True, False])
@pytest.mark.parametrize("name", ["gqa4-ragged", "gqa3", "gqa8-appended-ragged",
                                  "size1-clusters", "single-cluster"])
def test_cluster_lse(name, two_pass, monkeypatch):
    monkeypatch.setattr(ts, "LSE_TWO_PASS", two_pass)
    check_cluster_lse(case(name))


@pytest.mark.parametrize("name", ["gqa4-ragged", "gqa1-appended", "size1-clusters",
                                  "single-cluster", "paper-ranking", "diffuse-gqa4-ragged",
                                  "diffuse-gqa1-appended"])
def test_tactic_cut(name):
    check_tactic_cut(case(name))


@pytest.mark.parametrize("name", ["gqa4-ragged", "gqa8-appended-ragged", "size1-clusters",
                                  "diffuse-gqa4-ragged"])
def test_append_clusters(name):
    check_append_clusters(case(name))


@pytest.mark.parametrize("name", ["gqa4-ragged", "gqa3", "gqa1-appended",
                                  "gqa8-appended-ragged", "single-cluster",
                                  "diffuse-gqa1-appended"])
def test_select_triton_matches_torch(name, monkeypatch):
    check_select(case(name), monkeypatch)


def test_bfloat16_keys(monkeypatch):
    check_select(case("gqa4-ragged", torch.bfloat16), monkeypatch)


def test_consumers_called_again_on_one_ranking():
    """Timing a stage alone calls cluster_lse and tactic_cut again on one (Triton) ranking,
    whose counters are zeroed once: each later call takes fresh ones and gives the first
    call's result (reused counters sent the list slots past the lists: an illegal memory
    access on the GPU)."""
    from tactic_helpers import _by_id

    c = case("gqa4-ragged")
    ranking = c.rank("triton")
    first, again = c.lse(ranking, "triton"), c.lse(ranking, "triton")
    b, hq, _ = c.q.shape
    hkv = c.k.shape[1]
    assert torch.equal(first.count, again.count) and (first.count > 0).all()
    for bi in range(b):
        for h in range(hkv):
            assert _by_id(first, bi, h, hq // hkv) == _by_id(again, bi, h, hq // hkv)
    (p1, i1, c1), (p2, i2, c2) = c.cut(first, ranking, "triton"), c.cut(first, ranking, "triton")
    assert torch.equal(p1, p2) and torch.equal(c1, c2)
    for bi in range(b):
        for h in range(hkv):
            n = int(c1[bi, h])
            assert sorted(i1[bi, h, :n].tolist()) == sorted(i2[bi, h, :n].tolist())
