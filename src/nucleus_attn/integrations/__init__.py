"""Integrations of sparse decode with model libraries.

:mod:`~nucleus_attn.integrations.hf` (Hugging Face transformers) is imported on first use,
so that ``import nucleus_attn.integrations`` needs no transformers.
"""

from __future__ import annotations

from typing import Any

from .stats import format_budget, print_summary
from .tp import check_tensor_parallel, load_tensor_parallel, tp_world_size

_FROM_HF = ("enable", "disable", "SparseDecodeHandle", "SUPPORTED_MODEL_TYPES")


def __getattr__(name: str) -> Any:
    if name in _FROM_HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_FROM_HF, "check_tensor_parallel", "format_budget", "load_tensor_parallel",
           "print_summary", "tp_world_size"]
