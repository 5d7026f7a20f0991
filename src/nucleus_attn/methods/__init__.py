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
        if not params:
            return method
        cls = type(method)
    elif isinstance(method, str):
        cls = get_spec(method).config
    else:
        raise TypeError(
            f"method must be a name ({', '.join(REGISTRY)}) or a config such as "
            f"nucleus_attn.Twilight(p=0.8), got {type(method).__name__}"
        )
    fields = parameter_names(cls)
    unknown = [k for k in params if k not in fields]
    if unknown:
        where = (f" (the {cls.__name__} passed as method)"
                 if isinstance(method, MethodConfig) else "")
        raise TypeError(
            f"{cls.name}{where} has no parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; its parameters are: "
            f"{', '.join(fields) or '(none)'}. For another method pass its name or config "
            "with its own parameters, e.g. method='twilight', p=0.8 or "
            "nucleus_attn.Twilight(p=0.8)"
        )
    try:
        return method.replace(**params) if isinstance(method, MethodConfig) else cls(**params)
    except TypeError as err:
        text = str(err)
        prefix = "" if text.startswith(f"{cls.name}:") else f"{cls.name}: "
        raise TypeError(f"{prefix}{text}; its parameters are: {', '.join(fields)}") from None


def parameter_names(cls: type[MethodConfig]) -> list[str]:
    """A config class's parameters: its own fields first, then the keyword-only ones every
    method shares (``dense_below``)."""
    return [f.name for f in sorted(dataclasses.fields(cls), key=lambda f: f.kw_only)]


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
    "parameter_names",
    "parse_method",
    "parse_sweep",
    "spec_of",
]
