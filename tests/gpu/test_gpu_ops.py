"""Every kernel against its torch reference and float64, compiled, at full size
(Llama-3-8B heads: 32 query / 8 KV heads, d=128; plus the awkward shapes of the CPU tests)."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import (
    check_assign_nearest,
    check_centroid_scores,
    check_cluster_tokens,
    check_dense_attention,
    check_gathered_scores,
    check_int4_estimates,
    check_int4_scores,
    check_page_minmax,
    check_page_scores,
    check_page_stats,
    check_quantize_int4,
    check_sparse_attention,
    check_topk_pages,
    check_topk_ties,
    check_topp_select,
)

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize(("n", "d", "page_size", "dtype"), [
    (17, 128, 16, torch.float32), (4099, 64, 16, torch.float16), (32768, 128, 16, torch.bfloat16),
    (30001, 256, 5, torch.bfloat16)])
@pytest.mark.parametrize("ragged", [False, True])
def test_page_minmax(n, d, page_size, dtype, ragged):
    check_page_minmax(DEV, 4, 8, n, d, page_size, dtype, ragged, 0, seed=n)
    check_page_minmax(DEV, 4, 8, n, d, page_size, dtype, ragged, n // page_size // 2, seed=n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "pages", "d"), [(4, 8192, 128), (3, 257, 64), (1, 100, 256)])
def test_page_scores(dtype, group, pages, d):
    check_page_scores(DEV, 4, 8, group, pages, d, 16, dtype, ragged=True, seed=pages)


@pytest.mark.parametrize(("n", "k_pages", "hkv", "group"), [
    (32768, 512, 8, 4), (131072, 2048, 8, 4), (4099, 300, 2, 3), (1000, 1, 2, 3)])
@pytest.mark.parametrize("ragged", [False, True])
def test_topk_pages(n, k_pages, hkv, group, ragged):
    check_topk_pages(DEV, 4, hkv, group, n, 16, k_pages, 4, 64, ragged, seed=n + group)


# --- the split selection kernels at full size (B up to 8, N up to 131072) ----------------

@pytest.mark.parametrize(("b", "group", "pages", "d"), [(8, 4, 8192, 128), (1, 4, 8192, 128),
                                                        (4, 3, 1000, 64)])
def test_page_scores_stats(b, group, pages, d):
    check_page_stats(DEV, b, 8, group, pages, d, torch.bfloat16, True, seed=pages + b)


@pytest.fixture
def split_topk(monkeypatch):
    """Long rows take the split top-k kernel even where the row kernel would be chosen."""
    from nucleus_attn.ops import topk_split

    monkeypatch.setattr(topk_split, "split_wanted", lambda pages, *a, **k: pages >= 1024)


@pytest.mark.usefixtures("split_topk")
@pytest.mark.parametrize(("b", "n", "k_pages"), [(8, 131072, 82), (8, 131072, 2048),
                                                 (1, 131072, 2048), (8, 32768, 164),
                                                 (2, 1 << 20, 4096)])
@pytest.mark.parametrize("ragged", [False, True])
def test_topk_pages_split(b, n, k_pages, ragged):
    check_topk_pages(DEV, b, 8, 4, n, 16, k_pages, 4, 64, ragged, seed=n + k_pages + b)


@pytest.mark.usefixtures("split_topk")
@pytest.mark.parametrize(("levels", "k_pages"), [(1, 82), (4, 2048), (300, 500)])
def test_topk_pages_split_ties(levels, k_pages):
    check_topk_ties(DEV, 8, 8, 4, 131072, k_pages, levels, seed=levels)


@pytest.mark.parametrize(("b", "n", "m"), [(8, 131072, None), (1, 131072, None),
                                         (4, 32768, 8192), (2, 4099, 1000)])
def test_int4_estimates(b, n, m):
    # m=None: range mode (every valid position a candidate, no index list)
    check_int4_estimates(DEV, b, 8, 4, n, m, 128, torch.bfloat16, seed=n + b)


@pytest.mark.parametrize(("kind", "b", "m", "p", "forced"), [
    ("peaked", 8, 32768, 0.9, "span"), ("randn", 1, 131072, 0.9, "none"),
    ("sea", 4, 40000, 0.95, "mask"), ("flat", 2, 70000, 0.5, "none"),
    ("planted", 8, 32768, 0.99, "span"), ("ties", 2, 4099, 0.9, "mask")])
def test_topp_select_index_list(kind, b, m, p, forced):
    check_topp_select(DEV, b, 8, 4, m, p, kind, seed=m + b, forced_kind=forced)


@pytest.mark.parametrize(("kind", "b", "n", "p"), [
    ("peaked", 8, 131072, 0.9), ("peaked", 1, 131072, 0.95), ("sink", 2, 65536, 0.99),
    ("laplace", 4, 32768, 0.8), ("neginf", 2, 4099, 0.9)])
def test_topp_select_range(kind, b, n, p):
    check_topp_select(DEV, b, 8, 4, n, p, kind, seed=n + b, range_mode=True)


@pytest.mark.parametrize(("group", "m"), [(1, 4099), (3, 30001), (8, 17000)])
def test_topp_select_gqa(group, m):
    check_topp_select(DEV, 4, 2, group, m, 0.9, "randn", seed=m)


@pytest.mark.parametrize(("n", "d", "dtype"), [
    (17, 128, torch.float32), (32768, 128, torch.bfloat16), (4099, 256, torch.float16),
    (1000, 64, torch.bfloat16)])
@pytest.mark.parametrize("sliced", [False, True])
def test_quantize_int4(n, d, dtype, sliced):
    check_quantize_int4(DEV, 4, 8, n, d, dtype, sliced, seed=n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "n", "m", "d"), [(4, 32768, 8192, 128), (3, 4099, 1000, 64),
                                                    (8, 1000, 17, 256), (1, 17, 1, 128)])
def test_int4_scores(dtype, group, n, m, d):
    check_int4_scores(DEV, 4, 8, group, n, m, d, dtype, seed=n + group)


SHAPES = [(8, 4, 32768, 8192, 128), (8, 4, 131072, 2600, 128), (2, 3, 4099, 1000, 64),
          (1, 8, 1000, 17, 256), (4, 1, 17, 17, 128)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize(("hkv", "group", "n", "m", "d"), SHAPES)
def test_sparse_attention(dtype, hkv, group, n, m, d):
    check_sparse_attention(DEV, 4, hkv, group, n, m, d, dtype, seed=n + m)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize(("hkv", "group", "n", "d"),
                         [(8, 4, 131072, 128), (8, 4, 4099, 128), (2, 3, 1000, 64),
                          (1, 8, 17, 256), (4, 1, 30001, 128)])
def test_dense_attention_over_span(dtype, hkv, group, n, d):
    check_dense_attention(DEV, 4, hkv, group, n, d, dtype, seed=n + group)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize(("hkv", "group", "n", "m", "d"), SHAPES)
def test_gathered_scores(dtype, hkv, group, n, m, d):
    check_gathered_scores(DEV, 4, hkv, group, n, m, d, dtype, seed=n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "c", "d"), [(4096, 256, 128), (1000, 63, 64), (17, 3, 256)])
def test_assign_nearest(dtype, n, c, d):
    check_assign_nearest(DEV, 4, 8, n, c, d, dtype, seed=n)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("cent_dtype", [torch.float32, "same"])
@pytest.mark.parametrize(("group", "c", "d"), [(4, 8192, 128), (3, 257, 64), (8, 70, 256)])
def test_centroid_scores(dtype, cent_dtype, group, c, d):
    cd = dtype if cent_dtype == "same" else cent_dtype
    check_centroid_scores(DEV, 4, 8, group, c, d, dtype, cd, seed=c)


@pytest.mark.parametrize(("n", "c", "capacity"), [(131072, 8192, 131072), (4099, 300, 1000)])
def test_cluster_tokens(n, c, capacity):
    check_cluster_tokens(DEV, 2, 4, n, c, capacity, seed=n)
