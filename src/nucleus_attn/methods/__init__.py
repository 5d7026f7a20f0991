"""The method registry: one name -> (config class, select function, state builder).

This table is the single list read by ``sparse_decode``, the model integration, the CLI,
the eval harness, the benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import dense, oracle, quest, streaming, tactic, twilight
from .base import MethodConfig, MethodSpec, MethodState, Selection
from .dense import DenseConfig
from .oracle import OracleTopKConfig, OracleTopPConfig
from .quest import QuestConfig
from .streaming import StreamingConfig
from .tactic import TacticConfig
from .twilight import TwilightConfig

REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        dense.SPEC,
        oracle.TOPK,
        oracle.TOPP,
        streaming.SPEC,
        quest.SPEC,
        twilight.SPEC,
        tactic.SPEC,
    )
}


def methods() -> list[str]:
    """Names of the registered methods."""
    return list(REGISTRY)


def get_spec(name: str) -> MethodSpec:
    """The registry entry of a method name (ValueError listing the known names)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}"
        ) from None


def make_config(method: str | MethodConfig, **params: Any) -> MethodConfig:
    """A validated config from a name plus parameters, or a config plus overrides.

    Examples
    --------
    >>> make_config("twilight", p=0.9).p
    0.9
    """
    if isinstance(method, MethodConfig):
        return method.replace(**params) if params else method
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a name ({', '.join(REGISTRY)}) or a config such as "
            f"nucleus_attn.Twilight(p=0.95), got {type(method).__name__}"
        )
    cls = get_spec(method).config
    try:
        return cls(**params)
    except TypeError as err:
        # the method's own fields first, the keyword-only ones every method shares after
        fields = sorted((f for f in dataclasses.fields(cls)), key=lambda f: f.kw_only)
        fields = [f.name for f in fields]
        raise TypeError(
            f"{method}: {err}; its parameters are: {', '.join(fields) or '(none)'}"
        ) from None


from .parse import describe, parse_method, parse_sweep  # noqa: E402  (needs make_config)


def spec_of(cfg: MethodConfig) -> MethodSpec:
    """The registry entry of a config."""
    return get_spec(cfg.name)


__all__ = [
    "REGISTRY",
    "DenseConfig",
    "MethodConfig",
    "MethodSpec",
    "MethodState",
    "OracleTopKConfig",
    "OracleTopPConfig",
    "QuestConfig",
    "Selection",
    "describe",
    "StreamingConfig",
    "TacticConfig",
    "TwilightConfig",
    "get_spec",
    "make_config",
    "methods",
    "parse_method",
    "parse_sweep",
    "spec_of",
]
