"""Tactic's cluster kernels (nearest-centroid assignment, centroid scores) against their
torch references and float64, in Triton's interpreter."""

from __future__ import annotations

import math

import pytest
import torch
from ops_helpers import (
    check_assign_nearest,
    check_centroid_scores,
    check_cluster_tokens,
    interpreter,
)

from nucleus_attn import ops
from nucleus_attn.span import KeySpan

pytestmark = pytest.mark.usefixtures(interpreter.__name__)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "c", "d"), [(1, 1, 64), (17, 3, 128), (1000, 63, 64),
                                           (300, 20, 256)])
def test_assign_nearest(dtype, n, c, d):
    check_assign_nearest("cpu", 2, 2, n, c, d, dtype, seed=n + c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cent_dtype", ["float32", "same"])
@pytest.mark.parametrize(("group", "c", "d"), [(1, 1, 64), (3, 17, 128), (4, 257, 64),
                                               (8, 70, 256)])
def test_centroid_scores(dtype, cent_dtype, group, c, d):
    cd = torch.float32 if cent_dtype == "float32" else dtype
    check_centroid_scores("cpu", 2, 2, group, c, d, dtype, cd, seed=c + group)


def test_kmeans_triton_matches_torch():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 300, 64, generator=g)
    span = KeySpan(torch.tensor([0, 40]), torch.tensor([300, 260]), 300)
    got = ops.kmeans(k, span, 16, 3, 128, impl="triton")
    ref = ops.kmeans(k, span, 16, 3, 128, impl="torch")
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "c", "capacity"), [(1, 1, 1), (17, 3, 17), (1000, 63, 400),
                                                  (4099, 300, 4099), (500, 40, 50)])
def test_cluster_tokens(n, c, capacity):
    check_cluster_tokens("cpu", 2, 2, n, c, capacity, seed=n + c)


def test_split_outliers_and_spread_against_brute_force():
    g = torch.Generator().manual_seed(7)
    k = torch.randn(2, 3, 120, 32, generator=g)
    span = KeySpan(torch.tensor([0, 30]), torch.tensor([120, 100]), 120)
    cents, labels, sizes = ops.kmeans(k, span, 8, 3, 64, impl="torch")
    c = sizes.shape[-1]
    c2, l2, s2 = ops.split_outliers(k, cents, labels, sizes, 0.1)
    assert c2.shape[2] == s2.shape[-1] == c + 12
    for b, valid in ((0, 120), (1, 70)):
        want = math.ceil(0.1 * valid)
        for h in range(3):
            lab = labels[b, h]
            dist = torch.where(lab >= 0, (k[b, h] - cents[b, h, lab.clamp(min=0)]).norm(dim=-1),
                               torch.tensor(-1.0))
            far = set(torch.topk(dist, want).indices.tolist())
            moved = set(torch.nonzero(l2[b, h] >= c).flatten().tolist())
            assert moved == far  # the farthest keys, padding never
            assert (s2[b, h, c:c + want] == 1).all() and (s2[b, h, c + want:] == 0).all()
            assert torch.equal(torch.bincount(l2[b, h][l2[b, h] >= 0], minlength=c + 12),
                               s2[b, h])
            for cl in torch.nonzero(s2[b, h]).flatten().tolist():
                m = k[b, h][l2[b, h] == cl].double()
                torch.testing.assert_close(c2[b, h, cl].double(), m.mean(0), atol=1e-5,
                                           rtol=1e-5)
    spread = ops.cluster_spread(k, c2, l2, s2)
    b, h, cl = 0, 1, int(torch.argmax(s2[0, 1]))
    m = k[b, h][l2[b, h] == cl].double()
    want = ((m - m.mean(0)) ** 2).sum(-1).mean() / 32
    assert abs(spread[b, h, cl].item() - want.item()) < 1e-5
    assert (spread[s2 <= 1] == 0).all()
