"""Dense attention: every valid key, the baseline all speed and accuracy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..span import KeySpan
from .base import MethodConfig, MethodSpec, Selection


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """Exact attention over every valid key (no parameters)."""

    name: ClassVar[str] = "dense"


def select(q: Tensor, k: Tensor, state: None, span: KeySpan, cfg: DenseConfig,
           scale: float) -> Selection:
    """Keep everything."""
    return Selection.everything(span, k.shape[1])


SPEC = MethodSpec("dense", DenseConfig, select)
