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
