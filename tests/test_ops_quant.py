"""int4 key kernels (quantization and its append, estimated scores over candidates)
against their torch references and float64, in Triton's interpreter (the hot path's
slot-major estimates: ``test_ops_topp.py``)."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import check_int4_scores, check_quantize_int4, interpreter

pytestmark = pytest.mark.usefixtures(interpreter.__name__)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "d"), [(1, 64), (17, 128), (1000, 64), (4099, 64), (50, 256)])
@pytest.mark.parametrize("sliced", [False, True])
def test_quantize_int4(n, d, dtype, sliced):
    # sliced: a strided view of a larger cache, as Int4Keys.extend quantizes the new tokens
    check_quantize_int4("cpu", 2, 2, n, d, dtype, sliced, seed=n + d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("group", "n", "m", "d"), [(1, 1, 1, 64), (3, 17, 17, 128),
                                                    (4, 1000, 300, 64), (8, 4099, 700, 64),
                                                    (4, 300, 100, 256)])
def test_int4_scores(dtype, group, n, m, d):
    check_int4_scores("cpu", 2, 2, group, n, m, d, dtype, seed=n + group)
