"""sparse_decode: every method's invariants on awkward shapes, against dense and oracles."""

from __future__ import annotations

import math

import pytest
import torch
from method_cases import METHOD_CASES

import nucleus_attn as na
from nucleus_attn.synthetic import peaked_qkv

ALL = na.methods()


def rand_qkv(b, hq, hkv, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def dense_ref64(q, k, v, lengths=None):
    """float64 attention over valid keys."""
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, 1)
    vv = v.double().repeat_interleave(hq // hkv, 1)
    s = torch.einsum("bhd,bhnd->bhn", q.double(), kk) / math.sqrt(d)
    if lengths is not None:
        s = s.masked_fill(torch.arange(n)[None, None] >= lengths[:, None, None], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), vv)


def test_registry_matches_case_table():
    assert set(ALL) == set(METHOD_CASES), "every registered method needs a row in METHOD_CASES"
    assert ALL[:3] == ["dense", "oracle-topk", "oracle-topp"]


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize(("n", "hq", "hkv", "d"), [(1, 4, 4, 64), (17, 3, 1, 128),
                                                   (1000, 8, 2, 64), (4099, 8, 1, 64),
                                                   (300, 8, 1, 256)])
def test_full_budget_is_dense(method, n, hq, hkv, d):
    q, k, v = rand_qkv(2, hq, hkv, n, d, seed=n)
    out, info = na.sparse_decode(q, k, v, method, **METHOD_CASES[method]["full"])
    ref = dense_ref64(q, k, v)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    assert torch.equal(info.kept, torch.full((2, hkv), n))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("level", ["easy", "hard"])
def test_invariants_on_peaked_attention(method, level):
    x = peaked_qkv(2, 8, 2, 1000, 64, seed=3)
    out, info = na.sparse_decode(x.q, x.k, x.v, method, diagnostics=True,
                                 **METHOD_CASES[method][level])
    n = x.k.shape[2]
    assert out.shape == x.q.shape and out.dtype == x.q.dtype and torch.isfinite(out).all()
    assert (info.kept >= 1).all()
    assert (info.kept <= info.candidates).all() and (info.candidates <= n).all()
    assert info.mass.shape == (2, 8)
    assert ((info.mass > 0) & (info.mass <= 1 + 1e-5)).all()
    mask = info.kept_mask(n)
    assert torch.equal(mask.sum(-1), info.kept)
    # the output is exactly attention over the kept set
    s = torch.einsum("bhgd,bhnd->bhgn", x.q.view(2, 2, 4, 64).double(), x.k.double()) / 8.0
    s = s.masked_fill(~mask[:, :, None], float("-inf"))
    ref = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), x.v.double()).reshape(2, 8, 64)
    assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["oracle-topk", "oracle-topp", "quest", "twilight", "tactic"])
def test_planted_keys_are_kept(method):
    x = peaked_qkv(2, 8, 2, 4099, 64, planted=4, seed=7)
    params = {"oracle-topk": {"budget": 64}, "oracle-topp": {"p": 0.9}, "quest": {"budget": 256},
              "twilight": {"p": 0.9}, "tactic": {"p": 0.9}}[method]
    _, info = na.sparse_decode(x.q, x.k, x.v, method, **params)
    assert info.kept_mask(4099).gather(-1, x.planted).all()
    if method in ("twilight", "tactic"):  # adaptive methods keep few tokens on peaked heads
        assert info.kept_fraction.mean() < 0.5


def test_streaming_misses_planted_keys_in_the_middle():
    x = peaked_qkv(1, 4, 1, 4099, 64, planted=4, seed=7)
    _, info = na.sparse_decode(x.q, x.k, x.v, "streaming", sink=4, window=64)
    keep = info.kept_mask(4099)[0, 0]
    assert keep[:4].all() and keep[-64:].all() and int(keep.sum()) == 68


def _sorted_nucleus(w: torch.Tensor, p: float) -> torch.Tensor:
    """Sort-based definition: the smallest prefix of the descending weights with mass >= p."""
    vals, order = torch.sort(w, descending=True)
    cum = torch.cumsum(vals, -1)
    k = int((cum < p * cum[-1]).sum()) + 1
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95, 0.999])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2), (8, 1)])
def test_oracle_topp_is_the_sorted_nucleus(p, hq, hkv):
    x = peaked_qkv(2, hq, hkv, 777, 64, spread=1.5, seed=int(p * 1000) + hq)
    _, info = na.sparse_decode(x.q, x.k, x.v, "oracle-topp", p=p, diagnostics=True)
    mask = info.kept_mask(777)
    s = torch.einsum("bhgd,bhnd->bhgn", x.q.view(2, hkv, hq // hkv, 64), x.k) / 8.0
    w64 = torch.softmax(s.double(), -1)
    for b in range(2):
        for h in range(hkv):
            union = torch.zeros(777, dtype=torch.bool)
            for g in range(hq // hkv):
                own = _sorted_nucleus(w64[b, h, g], p)
                union |= own
                assert w64[b, h, g][mask[b, h]].sum() >= p - 1e-6  # every head keeps >= p
                if hq == hkv:  # minimal: dropping the weakest kept token falls below p
                    kept_w = w64[b, h, g][mask[b, h]]
                    assert kept_w.sum() - kept_w.min() < p + 1e-6
            assert torch.equal(mask[b, h], union)
    assert (info.mass >= p - 1e-5).all()


@pytest.mark.parametrize("method", ALL)
def test_ragged_batch_equals_each_sequence_alone(method):
    params = dict(METHOD_CASES[method]["hard"])
    if method == "twilight":
        params["base_budget"] = 128  # a fraction would be of the padded N
    q, k, v = rand_qkv(3, 8, 2, 700, 64, seed=11)
    lengths = torch.tensor([700, 123, 451])
    out, info = na.sparse_decode(q, k, v, method, lengths=lengths, **params)
    for b, n in enumerate(lengths.tolist()):
        o1, i1 = na.sparse_decode(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], method,
                                  **params)
        torch.testing.assert_close(out[b:b + 1], o1, atol=1e-5, rtol=1e-5)
        assert torch.equal(info.kept[b], i1.kept[0])
        assert (info.kept_mask(700)[b, :, n:] == 0).all()  # padding is never attended


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(method, dtype):
    q, k, v = rand_qkv(2, 12, 3, 1000, 128, dtype=dtype, seed=5)
    out, _ = na.sparse_decode(q, k, v, method, **METHOD_CASES[method]["easy"])
    assert out.dtype == dtype and torch.isfinite(out).all()
    full, _ = na.sparse_decode(q, k, v, method, **METHOD_CASES[method]["full"])
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    ref = dense_ref64(q, k, v)
    assert (full.double() - ref).abs().max().item() <= 4 * ulp * ref.abs().max().item()


def test_config_objects_and_names_agree():
    x = peaked_qkv(1, 8, 2, 500, 64, seed=2)
    a, ia = na.sparse_decode(x.q, x.k, x.v, na.Twilight(p=0.9))
    b, ib = na.sparse_decode(x.q, x.k, x.v, "twilight", p=0.9)
    c, ic = na.sparse_decode(x.q, x.k, x.v, na.Twilight(p=0.5), p=0.9)  # override a field
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(ia.kept, ib.kept)
    assert na.make_config("quest", budget=64) == na.Quest(budget=64)


def test_top_p_methods_share_one_default_p():
    """One default p (0.9, the setting the accuracy studies chose), the same in every top-p
    method and in the label a default config gets."""
    assert na.Twilight().p == na.OracleTopP().p == na.Tactic().p == 0.9
    for name in ("twilight", "oracle-topp", "tactic"):
        assert na.describe(na.make_config(name)) == f"{name}:p=0.9"


@pytest.mark.parametrize("method", ["quest", "twilight"])
def test_state_extend_matches_fresh_build(method):
    """Metadata built on a prefix and extended token by token equals a fresh build."""
    cfg = na.make_config(method, **METHOD_CASES[method]["hard"])
    x = peaked_qkv(2, 8, 2, 530, 64, seed=4)
    span = na.KeySpan.full(2, 500)
    state = na.new_state(cfg, x.k[:, :, :500], span)
    for n in (501, 517, 530):
        state.extend(x.k[:, :, :n], span.with_length(n))
    full_span = na.KeySpan.full(2, 530)
    fresh = na.new_state(cfg, x.k, full_span)
    o1, i1 = na.decode_step(x.q, x.k, x.v, cfg, state, full_span, 0.125)
    o2, i2 = na.decode_step(x.q, x.k, x.v, cfg, fresh, full_span, 0.125)
    assert torch.equal(o1, o2) and torch.equal(i1.kept, i2.kept)


def test_tactic_attends_appended_tokens_and_reclusters():
    cfg = na.Tactic(p=0.5, recluster_every=20)
    x = peaked_qkv(1, 4, 1, 540, 64, seed=6)
    state = na.new_state(cfg, x.k[:, :, :500], na.KeySpan.full(1, 500))
    state.extend(x.k[:, :, :510], na.KeySpan.full(1, 510))
    _, info = na.decode_step(x.q, x.k[:, :, :510], x.v[:, :, :510], cfg, state,
                             na.KeySpan.full(1, 510), 0.125)
    assert info.kept_mask(510)[0, 0, 500:].all()  # unclustered decode tokens are kept
    assert state.clustered == 500
    state.extend(x.k, na.KeySpan.full(1, 540))  # 40 new tokens >= 20: re-cluster
    assert state.clustered == 540 and (state.labels[..., :540] >= 0).all()
