"""GPU tests: compiled Triton kernels at full size. Every test here is marked ``gpu`` and
skipped when no CUDA device is present (CPU CI); ``tests/ops_helpers.py`` is shared with
the interpreter tests one folder up."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
