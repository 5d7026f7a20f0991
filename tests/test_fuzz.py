"""Hypothesis: random shapes, GQA ratios, raggedness and targets against dense/oracle semantics."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from method_cases import METHOD_CASES

import nucleus_attn as na

shapes = st.fixed_dictionaries({
    "b": st.integers(1, 3),
    "hkv": st.integers(1, 3),
    "group": st.sampled_from([1, 3, 4, 8]),
    "n": st.integers(1, 300),
    "d": st.sampled_from([8, 16, 64]),
    "seed": st.integers(0, 2**16),
    "ragged": st.booleans(),
})

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def make(s):
    g = torch.Generator().manual_seed(s["seed"])
    hq = s["hkv"] * s["group"]
    q = torch.randn(s["b"], hq, s["d"], generator=g) * 2
    k = torch.randn(s["b"], s["hkv"], s["n"], s["d"], generator=g)
    v = torch.randn(s["b"], s["hkv"], s["n"], s["d"], generator=g)
    lengths = None
    if s["ragged"]:
        lengths = torch.randint(1, s["n"] + 1, (s["b"],), generator=g)
    return q, k, v, lengths


def dense64(q, k, v, lengths):
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    s = torch.einsum("bhd,bhnd->bhn", q.double(), k.double().repeat_interleave(hq // hkv, 1))
    s = s / math.sqrt(d)
    if lengths is not None:
        s = s.masked_fill(torch.arange(n)[None, None] >= lengths[:, None, None], float("-inf"))
    return torch.softmax(s, -1), torch.einsum(
        "bhn,bhnd->bhd", torch.softmax(s, -1), v.double().repeat_interleave(hq // hkv, 1))


@SETTINGS
@given(s=shapes, method=st.sampled_from(na.methods()))
def test_full_setting_equals_dense(s, method):
    q, k, v, lengths = make(s)
    out, info = na.sparse_decode(q, k, v, method, lengths=lengths,
                                 **METHOD_CASES[method]["full"])
    _, ref = dense64(q, k, v, lengths)
    assert (out.double() - ref).abs().max() <= 1e-5
    expect = torch.full_like(info.kept, s["n"]) if lengths is None else \
        lengths[:, None].expand_as(info.kept)
    assert torch.equal(info.kept, expect)


@SETTINGS
@given(s=shapes, method=st.sampled_from(na.methods()), level=st.sampled_from(["easy", "hard"]))
def test_any_setting_is_attention_over_its_kept_set(s, method, level):
    q, k, v, lengths = make(s)
    out, info = na.sparse_decode(q, k, v, method, lengths=lengths, diagnostics=True,
                                 **METHOD_CASES[method][level])
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    mask = info.kept_mask(n)
    valid = torch.ones(b, n, dtype=torch.bool) if lengths is None else \
        torch.arange(n)[None] < lengths[:, None]
    assert not (mask & ~valid[:, None]).any()
    assert (info.kept >= 1).all() and (info.kept <= info.candidates).all()
    probs, _ = dense64(q, k, v, lengths)
    m = mask.repeat_interleave(hq // hkv, 1)
    torch.testing.assert_close(info.mass.double(), (probs * m).sum(-1), atol=1e-5, rtol=1e-5)
    s64 = torch.einsum("bhd,bhnd->bhn", q.double(), k.double().repeat_interleave(hq // hkv, 1))
    s64 = (s64 / math.sqrt(d)).masked_fill(~m, float("-inf"))
    ref = torch.einsum("bhn,bhnd->bhd", torch.softmax(s64, -1),
                       v.double().repeat_interleave(hq // hkv, 1))
    assert (out.double() - ref).abs().max() <= 1e-5


@SETTINGS
@given(s=shapes, p=st.floats(0.05, 0.999))
def test_oracle_topp_keeps_p_of_every_head(s, p):
    q, k, v, lengths = make(s)
    _, info = na.sparse_decode(q, k, v, "oracle-topp", p=p, lengths=lengths, diagnostics=True)
    assert (info.mass >= p - 1e-5).all()
