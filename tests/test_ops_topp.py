"""Top-p selection: the binned rule's Triton kernels against its torch reference (Triton's
interpreter), the rule's contract against the exact sort-based nucleus on awkward
distributions, and the exact nucleus (the oracle) itself.

The kernels and the reference run the same rule; they can differ only where a weight
falls within float32 rounding of a bin edge, so the checks allow a few tokens of
difference and require both to meet the contract (``ops_helpers.check_topp_contract``):
per query head at least p of the mass, per KV head at most 2% more tokens than the union
of the exact nuclei (and forced tokens) plus 16.
"""

from __future__ import annotations

import pytest
import torch
from ops_helpers import (
    check_int4_estimates,
    check_topp_contract,
    check_topp_select,
    gen,
    interpreter,
    random_indices,
    random_span,
    topp_logits,
)

from nucleus_attn import ops

KINDS = ["randn", "peaked", "ties", "sink", "flat", "sea", "planted", "laplace"]


@pytest.mark.usefixtures(interpreter.__name__)
@pytest.mark.parametrize(("hkv", "group", "m", "p", "kind", "forced"), [
    (1, 1, 1, 0.9, "randn", "none"), (2, 3, 17, 0.5, "randn", "span"),
    (1, 4, 1000, 0.9, "ties", "mask"), (1, 8, 3000, 0.95, "peaked", "span"),
    (2, 4, 1000, 0.999, "sink", "none"), (1, 4, 1100, 0.9, "flat", "none"),
    (2, 3, 300, 0.9, "neginf", "span"), (1, 1, 2100, 0.8, "planted", "mask")])
def test_topp_select(hkv, group, m, p, kind, forced):
    check_topp_select("cpu", 2, hkv, group, m, p, kind, seed=m + group, forced_kind=forced)


@pytest.mark.usefixtures(interpreter.__name__)
@pytest.mark.parametrize(("hkv", "group", "n", "p", "kind"), [
    (1, 4, 1000, 0.9, "randn"), (2, 3, 17, 0.5, "ties"), (1, 1, 4099, 0.99, "sink"),
    (1, 8, 2500, 0.9, "sea")])
def test_topp_select_range(hkv, group, n, p, kind):
    check_topp_select("cpu", 2, hkv, group, n, p, kind, seed=n, range_mode=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_binned_rule_contract(kind, p):
    # the tolerance test: the reference rule against the sort-based nucleus, per query
    # head and per KV head (GQA 4), on rows long enough to span many chunks
    g = gen(hash((kind, p)) % 1000)
    b, hkv, group, m = 1, 2, 4, 20000
    logits = topp_logits(b, hkv * group, m, kind, g)
    idx = torch.arange(m).expand(b, hkv, m)
    cnt = torch.full((b, hkv), m)
    kept, kcnt = ops.topp_select(logits, idx, cnt, p, impl="torch")
    check_topp_contract(logits, torch.ones(b, hkv, m, dtype=torch.bool), idx, kept, kcnt, p, m)


@pytest.mark.parametrize("kind", ["peaked", "flat", "sea", "planted"])
def test_binned_rule_contract_at_128k(kind):
    g = gen(7)
    logits = topp_logits(1, 1, 131072, kind, g)
    idx = torch.arange(131072).view(1, 1, -1)
    kept, kcnt = ops.topp_select(logits, idx, torch.tensor([[131072]]), 0.9, impl="torch")
    check_topp_contract(logits, torch.ones(1, 1, 131072, dtype=torch.bool), idx, kept, kcnt,
                        0.9, 131072)


def test_binned_rule_limits():
    # p = 1 keeps every candidate; a head without a finite logit keeps every candidate
    g = gen(3)
    logits = torch.randn(2, 4, 50, generator=g)
    logits[1, :2] = float("-inf")
    idx, cnt = random_indices(2, 2, 80, 50, g, "cpu")
    kept, kcnt = ops.topp_select(logits, idx, cnt, 1.0)
    assert torch.equal(kcnt, cnt)
    kept, kcnt = ops.topp_select(logits, idx, cnt, 0.5)
    assert kcnt[1, 0] == cnt[1, 0] and kcnt[0, 0] < cnt[0, 0]
    with pytest.raises(ValueError, match="p=0"):
        ops.topp_select(logits, idx, cnt, 0.0)


@pytest.mark.parametrize(("m", "p", "kind"), [(1, 0.9, "randn"), (17, 0.5, "ties"),
                                              (1000, 0.9, "sink"), (4099, 0.99, "randn")])
def test_topp_nucleus_is_the_exact_nucleus(m, p, kind):
    # the oracle: per query head the shortest prefix of the sorted weights reaching p
    # (ties at the threshold kept), union over the group
    g = gen(m)
    logits = topp_logits(2, 6, m, kind, g)
    idx, cnt = random_indices(2, 2, m + 5, m, g, "cpu")
    live = torch.arange(m) < cnt[..., None]
    logits = torch.where(live.repeat_interleave(3, 1), logits, float("-inf"))
    kept, kcnt = ops.topp_nucleus(logits, idx, cnt, p)
    w = torch.softmax(logits.double(), -1)
    for i in range(2):
        for h in range(2):
            want = set()
            for j in range(3):
                row = w[i, h * 3 + j]
                srt = torch.sort(row, descending=True).values
                k = int((torch.cumsum(srt, 0) < p * (1 - 1e-9)).sum())
                t = srt[min(k, m - 1)].item()
                want |= {int(idx[i, h, s]) for s in range(m) if row[s] >= t * (1 - 1e-6)}
            got = {int(x) for x in kept[i, h, : kcnt[i, h]]}
            assert got == want


@pytest.mark.usefixtures(interpreter.__name__)
@pytest.mark.parametrize(("group", "n", "m", "d", "dtype"), [
    (1, 17, 17, 64, torch.float32), (4, 1000, 300, 64, torch.bfloat16),
    (3, 2100, None, 128, torch.bfloat16), (8, 1100, None, 64, torch.float16)])
def test_int4_estimates(group, n, m, d, dtype):
    check_int4_estimates("cpu", 2, 2, group, n, m, d, dtype, seed=n + group)


@pytest.mark.usefixtures(interpreter.__name__)
@pytest.mark.parametrize("range_mode", [False, True])
def test_twilight_handoff_estimates_to_topp(range_mode):
    # int4_estimates hands its zeroed workspace to topp_select_estimates, which uses it
    # once; the kept sets equal the reference path's
    g = gen(4)
    b, hkv, group, n, d = 2, 2, 4, 2100, 64
    k = torch.randn(b, hkv, n, d, generator=g)
    q = torch.randn(b, hkv * group, d, generator=g) * 3
    codes, scale, zero = ops.quantize_int4(k, impl="torch")
    span = random_span(b, n, g, "cpu", True)
    kw = {}
    if not range_mode:
        idx = torch.sort(torch.randperm(n, generator=g)[:1500]).values.expand(b, hkv, 1500)
        kw = {"indices": idx.contiguous(), "counts": torch.tensor([[1500, 411], [1499, 1]])}
    est = ops.int4_estimates(q, codes, scale, zero, 0.125, span=span, impl="triton", **kw)
    assert est.workspace is not None
    kept, kcnt = ops.topp_select_estimates(est, 0.9, sink=3, window=5, impl="triton")
    assert est.take_workspace(est.workspace.numel()) is None, "the workspace was not used"
    ref = ops.int4_estimates(q, codes, scale, zero, 0.125, span=span, impl="torch", **kw)
    rkept, rcnt = ops.topp_select_estimates(ref, 0.9, sink=3, window=5, impl="torch")
    assert torch.equal(ops.indices_to_mask(kept, kcnt, n), ops.indices_to_mask(rkept, rcnt, n))
