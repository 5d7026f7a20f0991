"""Gathered sparse decode attention, dense decode over a key span and exact gathered scores
against their torch references and float64, in Triton's interpreter: ragged kept counts,
left/right padding, GQA packing."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import (
    check_dense_attention,
    check_gathered_scores,
    check_sparse_attention,
    interpreter,
)

pytestmark = pytest.mark.usefixtures(interpreter.__name__)

SHAPES = [  # (hkv, group, n, m, d)
    (2, 1, 1, 1, 64), (1, 3, 17, 17, 128), (2, 4, 1000, 300, 64), (1, 8, 4099, 700, 64),
    (2, 4, 300, 130, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("hkv", "group", "n", "m", "d"), SHAPES)
def test_sparse_attention(dtype, hkv, group, n, m, d):
    check_sparse_attention("cpu", 2, hkv, group, n, m, d, dtype, seed=n + group)


def test_sparse_attention_single_and_full_rows():
    # one kept token in a row, every candidate in another
    check_sparse_attention("cpu", 2, 2, 4, 500, 200, 64, torch.bfloat16, seed=5,
                           counts=[1, 200, 17, 64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("hkv", "group", "n", "m", "d"), SHAPES)
def test_gathered_scores(dtype, hkv, group, n, m, d):
    check_gathered_scores("cpu", 2, hkv, group, n, m, d, dtype, seed=n + d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("hkv", "group", "n", "d"),
                         [(2, 1, 1, 64), (1, 3, 17, 128), (2, 4, 1000, 64), (1, 8, 2051, 64),
                          (2, 4, 300, 256)])
def test_dense_attention_over_span(dtype, hkv, group, n, d):
    check_dense_attention("cpu", 3, hkv, group, n, d, dtype, seed=n + group)
