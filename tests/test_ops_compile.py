"""Every Triton kernel compiles for Hopper (sm_90) at the Llama-3-8B decode shape, on a
machine without a GPU (in a separate process: see tests/compile_kernels.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(here), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.join(here, "compile_kernels.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) >= 20, res.stdout
    for name in ("_page_minmax_kernel", "_topk_pages_kernel", "_int4_estimates_kernel",
                 "_scale_kernel", "_level1_kernel", "_cross1_kernel", "_level2_kernel",
                 "_cross2_kernel", "_keep_kernel", "_write_kernel",
                 "_sparse_attention_split_kernel", "_assign_nearest_kernel",
                 "_cluster_tokens_kernel", "_topk_split_kernel"):
        assert any(line.startswith(name) for line in lines), f"{name} was not compiled"
