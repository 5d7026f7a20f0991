"""Quest page kernels (min/max build and append, upper-bound scores, best pages) against
their torch references and float64, in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import check_page_minmax, check_page_scores, check_topk_pages, interpreter

pytestmark = pytest.mark.usefixtures(interpreter.__name__)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "d", "page_size"), [(1, 64, 16), (17, 128, 16), (1000, 64, 5),
                                                   (4099, 64, 16), (300, 256, 32)])
@pytest.mark.parametrize("ragged", [False, True])
def test_page_minmax(n, d, page_size, dtype, ragged):
    check_page_minmax("cpu", 2, 2, n, d, page_size, dtype, ragged, 0, seed=n + d + ragged)


@pytest.mark.parametrize("first_page", [1, 7, 62])
def test_page_minmax_append(first_page):
    # the append update recomputes the last partial page and the new ones
    check_page_minmax("cpu", 2, 3, 1000, 64, 16, torch.bfloat16, True, first_page,
                      seed=first_page)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("group", "pages", "d"), [(1, 1, 64), (3, 70, 128), (4, 257, 64),
                                                   (8, 20, 256)])
def test_page_scores(dtype, group, pages, d):
    check_page_scores("cpu", 2, 2, group, pages, d, 16, dtype, ragged=group % 2 == 1,
                      seed=pages + group)


@pytest.mark.parametrize(("n", "page_size", "k_pages", "sink", "window"), [
    (1, 16, 4, 4, 64), (17, 16, 1, 0, 1), (1000, 16, 20, 4, 64), (1000, 5, 3, 30, 200),
    (4099, 16, 64, 4, 64), (4099, 16, 400, 0, 1)])
@pytest.mark.parametrize(("hkv", "group"), [(1, 1), (2, 3), (1, 8)])
@pytest.mark.parametrize("ragged", [False, True])
def test_topk_pages(n, page_size, k_pages, sink, window, hkv, group, ragged):
    check_topk_pages("cpu", 2, hkv, group, n, page_size, k_pages, sink, window, ragged,
                     seed=n + k_pages + group)


@pytest.mark.parametrize(("group", "pages", "d", "ragged"), [(1, 1, 64, False),
                                                              (4, 257, 128, True),
                                                              (3, 70, 64, True)])
def test_page_scores_stats(group, pages, d, ragged):
    from ops_helpers import check_page_stats

    check_page_stats("cpu", 2, 2, group, pages, d, torch.bfloat16, ragged, seed=pages)


@pytest.fixture
def split_rows(monkeypatch):
    """Every row takes the split top-k kernel, in chunks of 16 pages (several per row),
    its last program scanning 64 keys and listing 16 boundary pages at a time."""
    from nucleus_attn.ops import topk_split

    monkeypatch.setattr(topk_split, "SPLIT_MIN_PAGES", 1)
    monkeypatch.setattr(topk_split, "MIN_CHUNK", 16)
    monkeypatch.setattr(topk_split, "SCAN", 64)
    monkeypatch.setattr(topk_split, "LIST_BLOCK", 16)
    monkeypatch.setattr(topk_split, "PREFIX_CHUNKS", 4)
    monkeypatch.setattr(topk_split, "STATS_BLOCK", 2)
    return topk_split


@pytest.mark.parametrize(("n", "page_size", "k_pages", "sink", "window", "hkv", "group"), [
    (1, 16, 4, 4, 64, 1, 1), (17, 16, 1, 0, 1, 2, 3), (1000, 5, 3, 30, 200, 1, 8),
    (4099, 16, 64, 4, 64, 2, 3), (4099, 16, 400, 0, 1, 1, 4)])
def test_topk_split(split_rows, n, page_size, k_pages, sink, window, hkv, group):
    check_topk_pages("cpu", 2, hkv, group, n, page_size, k_pages, sink, window, True,
                     seed=n + k_pages + group)


@pytest.mark.parametrize(("levels", "k_pages"), [(1, 10), (3, 17), (40, 100)])
def test_topk_split_ties_by_page_order(split_rows, levels, k_pages):
    from ops_helpers import check_topk_ties

    check_topk_ties("cpu", 2, 2, 3, 1500, k_pages, levels, seed=levels)


def test_topk_split_uses_the_producer_stats(split_rows):
    # Quest's path: page_scores(stats=True) hands its stats and zeroed workspace to
    # topk_pages, which uses the workspace once; the result equals the reference's
    from ops_helpers import gen, random_span

    from nucleus_attn import ops

    g = gen(2)
    b, hkv, group, n, d = 2, 2, 4, 2000, 64
    k = torch.randn(b, hkv, n, d, generator=g)
    q = torch.randn(b, hkv * group, d, generator=g)
    span = random_span(b, n, g, "cpu", True)
    kmin, kmax = ops.page_minmax(k, span, 16, impl="torch")
    bounds, st = ops.page_scores(q, kmin, kmax, span, 16, stats=True, scale=0.125,
                                 impl="triton")
    idx, cnt = ops.topk_pages(bounds, hkv, span, 16, 12, 4, 64, 0.125, stats=st, impl="triton")
    assert st.take_workspace(st.workspace.numel()) is None, "the workspace was not used"
    ridx, rcnt = ops.topk_pages(bounds, hkv, span, 16, 12, 4, 64, 0.125, impl="torch")
    assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx)
    with pytest.raises(ValueError, match="do not belong to bounds"):
        ops.topk_pages(bounds, hkv, span, 16, 12, 4, 64, 0.3, stats=st, impl="triton")
