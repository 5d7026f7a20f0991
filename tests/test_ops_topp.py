"""Top-p kernels (threshold bisection, union over the GQA group, forced items, compaction)
against their torch references and float64, in Triton's interpreter.

The kernel bisects over the same float32 bit patterns as the reference for the same 32
steps; its sums are added in another order, so where a candidate mass equals the target
to within float32 rounding the two may settle on neighbouring weights. The checks accept
exactly that: equal results, or results whose kept mass (float64) reaches p and whose
threshold is valid to within the summation rounding.
"""

from __future__ import annotations

import pytest
from ops_helpers import check_topp_select, check_topp_threshold, interpreter

from nucleus_attn.ops import topp

pytestmark = pytest.mark.usefixtures(interpreter.__name__)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("m", [1, 17, 1000, 4099])
def test_topp_threshold(p, m):
    check_topp_threshold("cpu", 3, m, p, seed=m)


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
@pytest.mark.parametrize(("hkv", "group", "m"), [(1, 1, 1), (2, 3, 17), (1, 4, 1000),
                                                 (1, 8, 4099), (2, 1, 300)])
@pytest.mark.parametrize("forced", ["none", "mask", "span"])
def test_topp_select(p, hkv, group, m, forced):
    check_topp_select("cpu", 2, hkv, group, m, p, forced, seed=m + group)


@pytest.mark.parametrize("forced", ["none", "span"])
@pytest.mark.parametrize("p", [0.3, 0.999])
def test_topp_select_streaming_rows(monkeypatch, forced, p):
    # rows of several chunks, and rows with more survivors than SURVIVORS slots (streamed
    # once per bisection step instead)
    monkeypatch.setattr(topp, "CHUNK", 128)
    monkeypatch.setattr(topp, "SURVIVORS", 64)
    check_topp_select("cpu", 2, 1, 2, 1000, p, forced, seed=11)


@pytest.mark.parametrize(("hkv", "group", "n"), [(1, 1, 17), (2, 3, 300), (1, 8, 1000)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_range_mode_equals_index_list(hkv, group, n, impl):
    # range mode (every valid position a candidate, no index list) is the index-list path
    # over the valid positions: same estimated logits there, same kept sets
    import torch
    from ops_helpers import gen, random_span

    from nucleus_attn import ops

    g = gen(n + group)
    b, d = 3, 64
    span = random_span(b, n, g, "cpu", ragged=True)
    k = torch.randn(b, hkv, n, d, generator=g)
    q = torch.randn(b, hkv * group, d, generator=g) * 3
    codes, scale, zero = ops.quantize_int4(k, impl="torch")
    est, stats = ops.int4_scores_range(q, codes, scale, zero, span, 0.125, stats=True,
                                       impl=impl)
    assert est.shape == (b, hkv * group, n)
    valid = span.valid_mask()[:, None, :].expand(b, hkv * group, n)
    assert torch.isinf(est[~valid]).all() and torch.isfinite(est[valid]).all()
    cand, ccnt = ops.mask_to_indices(span.valid_mask()[:, None, :].expand(b, hkv, n))
    ref = ops.int4_scores(q, codes, scale, zero, cand, ccnt, 0.125, impl="torch")
    live = torch.arange(n) < ccnt.repeat_interleave(group, 1)[..., None]
    got = est.gather(-1, cand.repeat_interleave(group, 1))
    torch.testing.assert_close(got[live], ref[live], rtol=1e-5, atol=1e-5)
    for p in (0.5, 0.9):
        kept, kcnt = ops.topp_select_range(est, span, hkv, p, sink=2, window=5, stats=stats,
                                           impl=impl)
        rkept, rcnt = ops.topp_select(ref, cand, ccnt, p, span=span, sink=2, window=5,
                                      impl="torch")
        assert torch.equal(kcnt, rcnt)
        assert torch.equal(ops.indices_to_mask(kept, kcnt, n), ops.indices_to_mask(rkept, rcnt, n))


def test_score_stats_combine_to_row_softmax():
    import torch

    from nucleus_attn import ops

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2500, generator=g) * 4
    x[0, 1, 1000:] = float("-inf")
    x[1, 2] = float("-inf")  # a row with no live logit
    st = ops.score_stats(x, chunk=1000)
    assert st.max.shape == (2, 3, 3)
    m, z = st.row_max_total()
    want_m = torch.where(torch.isfinite(x.amax(-1)), x.amax(-1), torch.zeros(2, 3))
    torch.testing.assert_close(m, want_m)
    torch.testing.assert_close(z, torch.exp(x - want_m[..., None]).sum(-1))


# --- the split kernel (long rows: many programs per row) ---------------------------------

@pytest.fixture
def split_rows(monkeypatch):
    """Every row takes the split kernel, in chunks of 128 (several programs per row)."""
    from nucleus_attn.ops import topp_split

    monkeypatch.setattr(topp_split, "split_wanted", lambda *args, **kwargs: True)
    monkeypatch.setattr(topp_split, "MIN_CHUNK", 128)
    return topp_split


@pytest.mark.parametrize(("hkv", "group", "m", "p", "kind", "forced"), [
    (1, 1, 1, 0.9, "randn", "none"), (2, 3, 17, 0.5, "randn", "span"),
    (1, 4, 1000, 0.9, "ties", "mask"), (1, 8, 4099, 0.95, "randn", "span"),
    (2, 4, 1000, 0.999, "sink", "none"), (1, 4, 1000, 0.9, "flat", "none"),
    (2, 3, 300, 0.9, "neginf", "span")])
def test_topp_split(split_rows, hkv, group, m, p, kind, forced):
    from ops_helpers import check_topp_split

    check_topp_split("cpu", 2, hkv, group, m, p, kind, seed=m + group, forced_kind=forced)


@pytest.mark.parametrize(("hkv", "group", "n", "p", "kind"), [
    (1, 4, 1000, 0.9, "randn"), (2, 3, 17, 0.5, "ties"), (1, 1, 4099, 0.99, "sink")])
def test_topp_split_range(split_rows, hkv, group, n, p, kind):
    from ops_helpers import check_topp_split

    check_topp_split("cpu", 2, hkv, group, n, p, kind, seed=n, range_mode=True)


@pytest.mark.parametrize("range_mode", [False, True])
def test_topp_split_with_producer_stats(split_rows, range_mode):
    # the stats and the zeroed workspace a producer hands over give the same kept sets
    from ops_helpers import check_topp_split

    check_topp_split("cpu", 2, 2, 4, 700, 0.9, "randn", seed=5, range_mode=range_mode,
                     with_stats=True)


def test_topp_split_tail_loops(split_rows, monkeypatch):
    # the last programs' loops over blocks (chunks, survivors, stats) with tiny blocks, and
    # the survivors bisected streamed from the list instead of in registers
    from ops_helpers import check_topp_split

    for name, value in (("SURVIVORS_IN_REGISTERS", 16), ("TAIL_CHUNKS", 2),
                        ("PREFIX_CHUNKS", 2), ("UNION_BLOCK", 16), ("STATS_BLOCK", 2)):
        monkeypatch.setattr(split_rows, name, value)
    check_topp_split("cpu", 2, 1, 4, 1000, 0.9, "randn", seed=8, forced_kind="span")


def test_twilight_handoff_int4_to_topp(split_rows):
    # int4_scores(stats=True) hands its stats and zeroed workspace to topp_select, which
    # uses the workspace once; the kept sets equal the reference path's
    import torch
    from ops_helpers import gen

    from nucleus_attn import ops

    g = gen(4)
    b, hkv, group, n, d = 2, 2, 4, 800, 64
    k = torch.randn(b, hkv, n, d, generator=g)
    q = torch.randn(b, hkv * group, d, generator=g) * 3
    codes, scale, zero = ops.quantize_int4(k, impl="torch")
    idx = torch.sort(torch.randperm(n, generator=g)[:600]).values.expand(b, hkv, 600).contiguous()
    cnt = torch.tensor([[600, 411], [599, 1]])
    est, st = ops.int4_scores(q, codes, scale, zero, idx, cnt, 0.125, stats=True, impl="triton")
    assert st.workspace is not None
    kept, kcnt = ops.topp_select(est, idx, cnt, 0.9, stats=st, impl="triton")
    assert st.take_workspace(st.workspace.numel()) is None, "the workspace was not used"
    ref = ops.int4_scores(q, codes, scale, zero, idx, cnt, 0.125, impl="torch")
    rkept, rcnt = ops.topp_select(ref, idx, cnt, 0.9, impl="torch")
    assert torch.equal(kcnt, rcnt) and torch.equal(kept, rkept)
