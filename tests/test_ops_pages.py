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
