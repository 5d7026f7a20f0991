"""Bad input gives ValueError/TypeError naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch

import nucleus_attn as na


def qkv(b=2, hq=8, hkv=2, n=64, d=32):
    return torch.randn(b, hq, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.5, float("nan"), True])
@pytest.mark.parametrize("method", ["oracle-topp", "twilight", "tactic"])
def test_p_outside_unit_interval(method, p):
    with pytest.raises(ValueError, match=r"p=.* must be a number in \(0, 1\].*p=1.0 for dense"):
        na.sparse_decode(*qkv(), method, p=p)


@pytest.mark.parametrize(("method", "field"), [("oracle-topk", "budget"), ("quest", "budget"),
                                               ("twilight", "base_budget"),
                                               ("streaming", "window")])
@pytest.mark.parametrize("value", [0, -5, 0.0, 1.5])
def test_bad_budgets(method, field, value):
    with pytest.raises(ValueError, match=field):
        na.sparse_decode(*qkv(), method, **{field: value})


def test_budget_of_wrong_type():
    with pytest.raises(TypeError, match="int .tokens. or a float"):
        na.Quest(budget="10")


def test_gqa_ratio():
    q, k, v = qkv(hq=9, hkv=2)
    with pytest.raises(ValueError, match=r"Hq=9 must be a multiple of KV heads Hkv=2"):
        na.sparse_decode(q, k, v)


def test_mismatched_head_dim_and_batch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head dim differs: q has d=16"):
        na.sparse_decode(q[..., :16], k, v)
    with pytest.raises(ValueError, match="batch size differs: q has B=1"):
        na.sparse_decode(q[:1], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        na.sparse_decode(q, k, v[:, :, :10])
    with pytest.raises(ValueError, match=r"q must have shape \(B, Hq, d\)"):
        na.sparse_decode(q[:, None], k, v)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        na.sparse_decode(q.long(), k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_float64_is_refused_as_the_message_says(which):
    """The message lists float16, bfloat16 and float32: float64 must not pass silently."""
    x = dict(zip("qkv", qkv(), strict=True))
    x = {name: t.double() if name == which else t for name, t in x.items()}
    with pytest.raises(TypeError, match=rf"{which} must be float16, bfloat16 or float32, got "
                                        rf"torch.float64; cast it, e.g. {which}.float\(\)"):
        na.sparse_decode(x["q"], x["k"], x["v"])


def test_mixed_dtypes_are_refused():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"one dtype, got q torch.float32, k torch.float16, v "
                                        r"torch.float16; .*q.to\(k.dtype\)"):
        na.sparse_decode(q, k.half(), v.half(), "twilight")
    with pytest.raises(TypeError, match="one dtype"):
        na.sparse_decode(q.bfloat16(), k.bfloat16(), v, "quest")
    out, _ = na.sparse_decode(q.half(), k.half(), v.half(), "quest")  # one dtype: fine
    assert out.dtype == torch.float16


def test_a_config_with_another_methods_parameter():
    """sparse_decode(q, k, v, Quest(...), p=0.9) named the dataclass' __init__ before."""
    with pytest.raises(TypeError, match=r"quest \(the QuestConfig passed as method\) has no "
                                        r"parameter 'p'; its parameters are: budget, "):
        na.sparse_decode(*qkv(), na.Quest(budget=8), p=0.9)
    with pytest.raises(TypeError, match=r"quest has no parameter 'p'.*Twilight\(p=0.8\)"):
        na.sparse_decode(*qkv(), "quest", p=0.9)
    assert na.make_config(na.Quest(budget=8), budget=16) == na.Quest(budget=16)  # its own


@pytest.mark.parametrize(("spec", "match"), [
    ("twilight:p", r"p has no value; write p=VALUE, e.g. twilight:p=0.9"),
    ("twilight:p=", r"p= has no value"),
    ("twilight:0.9", r"'0.9' is not key=value; write twilight:key=value with a key among: p, "),
    ("twilight:p=0.9,base", r"base has no value; write base=VALUE, e.g. twilight:base=dense"),
])
def test_method_spec_errors_name_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        na.parse_method(spec)


@pytest.mark.parametrize("lengths", [[0, 10], [10, 65], [-1, 3]])
def test_lengths_out_of_range(lengths):
    with pytest.raises(ValueError, match=r"lengths must be in \[1, N=64\]"):
        na.sparse_decode(*qkv(), "quest", lengths=torch.tensor(lengths))


def test_lengths_of_wrong_shape():
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(2,\)"):
        na.sparse_decode(*qkv(), lengths=torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="integer tensor"):
        na.sparse_decode(*qkv(), lengths=torch.tensor([3.0, 4.0]))


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="unknown method 'twilite'; known methods: dense, "):
        na.sparse_decode(*qkv(), "twilite")
    with pytest.raises(TypeError, match="its parameters are: p, base, base_budget"):
        na.sparse_decode(*qkv(), "twilight", budget=3)
    with pytest.raises(TypeError, match="method must be a name"):
        na.sparse_decode(*qkv(), 3)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(which, bad):
    q, k, v = qkv()
    {"q": q, "k": k, "v": v}[which].view(-1)[5] = bad
    with pytest.raises(ValueError, match=f"{which} contains NaN or inf"):
        na.sparse_decode(q, k, v, "twilight")


def test_other_config_checks():
    with pytest.raises(ValueError, match="base='pages' is not one of"):
        na.Twilight(base="pages")
    with pytest.raises(ValueError, match="sample_positions"):
        na.Tactic(sample_positions=(0.6, 0.1))
    with pytest.raises(ValueError, match="page_size=0 must be an int >= 1"):
        na.Quest(page_size=0)
    with pytest.raises(ValueError, match="int4 keys need an even head dim"):
        na.sparse_decode(torch.randn(1, 2, 7), torch.randn(1, 2, 40, 7),
                         torch.randn(1, 2, 40, 7), "twilight", base="dense")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", "triton")
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|impl='torch'"):
        na.sparse_decode(*qkv(), "twilight")
    monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NUCLEUS_ATTN_BACKEND='cuda' is not understood"):
        na.sparse_decode(*qkv(), "twilight")
