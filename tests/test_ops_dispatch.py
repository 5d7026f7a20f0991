"""Dispatch: every op's Triton path refuses CPU tensors without the interpreter, with an
error that says what to do."""

from __future__ import annotations

import math

import pytest
import torch

from nucleus_attn import ops
from nucleus_attn.span import KeySpan


def _calls():
    q, k = torch.randn(1, 4, 64), torch.randn(1, 2, 40, 64)
    idx, cnt = torch.arange(8).expand(1, 2, 8).contiguous(), torch.full((1, 2), 8)
    span = KeySpan.full(1, 40)
    kmin, kmax = ops.page_minmax(k, span, 16, impl="torch")
    codes, sc, ze = ops.quantize_int4(k, impl="torch")
    cents, sizes = torch.randn(1, 2, 5, 64), torch.ones(1, 2, 5, dtype=torch.int64)
    order = torch.arange(5).expand(1, 2, 5).contiguous()
    return {
        "page_minmax": lambda: ops.page_minmax(k, span, 16, impl="triton"),
        "page_scores": lambda: ops.page_scores(q, kmin, kmax, span, 16, impl="triton"),
        "topk_pages": lambda: ops.topk_pages(torch.randn(1, 4, 3), 2, span, 16, 2, 4, 8, 0.1,
                                             impl="triton"),
        "quantize_int4": lambda: ops.quantize_int4(k, impl="triton"),
        "int4_scores": lambda: ops.int4_scores(q, codes, sc, ze, idx, cnt, 0.1, impl="triton"),
        "topp_select": lambda: ops.topp_select(torch.randn(1, 4, 8), idx, cnt, 0.9,
                                               impl="triton"),
        "int4_estimates": lambda: ops.int4_estimates(q, codes, sc, ze, 0.1, span=span,
                                                     impl="triton"),
        "gathered_scores": lambda: ops.gathered_scores(q, k, idx, cnt, 0.1, impl="triton"),
        "sparse_attention": lambda: ops.sparse_attention(q, k, k, idx, cnt, 1 / math.sqrt(64),
                                                         impl="triton"),
        "assign_nearest": lambda: ops.assign_nearest(k, cents, sizes > 0, impl="triton"),
        "centroid_scores": lambda: ops.centroid_scores(q, cents, sizes, 0.1, impl="triton"),
        "cluster_tokens": lambda: ops.cluster_tokens(order, sizes, sizes.cumsum(-1) - 1,
                                                     torch.zeros(1, 2, 5, dtype=torch.int32), 5,
                                                     impl="triton"),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_triton_on_cpu_needs_the_interpreter(op, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("NUCLEUS_ATTN_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*impl='torch'"):
        _calls()[op]()


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl='cuda' is not one of"):
        ops.quantize_int4(torch.randn(1, 1, 4, 8), impl="cuda")
