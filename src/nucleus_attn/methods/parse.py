"""Method settings written as text, for the command line: ``name:key=value,key=value``.

A sweep gives several values to a key, ``twilight:p=0.8,0.9,0.95`` (a comma-separated item
without ``=`` is one more value of the key before it); the sweep is the product of all
keys' values. Values are read as int, then float, then bool (true/false), else string.
"""

from __future__ import annotations

import itertools
from typing import Any

from .base import MethodConfig


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_sweep(spec: str) -> list[MethodConfig]:
    """All configs of a setting such as ``"quest:budget=64,128,page_size=16"``.

    Examples
    --------
    >>> [c.p for c in parse_sweep("twilight:p=0.8,0.9")]
    [0.8, 0.9]
    """
    from . import get_spec, make_config, parameter_names

    name, _, rest = spec.partition(":")
    name = name.strip()
    cls = get_spec(name).config
    fields = {k: getattr(cls, k, None) for k in parameter_names(cls)}
    values: dict[str, list[Any]] = {}
    key = None
    for item in filter(None, (x.strip() for x in rest.split(","))):
        if "=" in item:
            key, _, val = item.partition("=")
            key = key.strip()
            if key in values:
                raise ValueError(f"{spec!r}: {key} is given twice; list its values once: "
                                 f"{key}=a,b,c")
            if not val.strip():
                raise ValueError(f"{spec!r}: {key}= has no value; write {key}=VALUE, e.g. "
                                 f"{name}:{key}={fields.get(key, 1)}")
            values[key] = [_value(val.strip())]
        elif key is None:
            if item in fields:
                raise ValueError(f"{spec!r}: {item} has no value; write {item}=VALUE, e.g. "
                                 f"{name}:{item}={fields[item]}")
            raise ValueError(f"{spec!r}: {item!r} is not key=value; write "
                             f"{name}:key=value with a key among: {', '.join(fields)}")
        elif item in fields:
            raise ValueError(f"{spec!r}: {item} has no value; write {item}=VALUE, e.g. "
                             f"{name}:{item}={fields[item]}")
        else:
            values[key].append(_value(item))
    keys = list(values)
    return [make_config(name.strip(), **dict(zip(keys, combo, strict=True)))
            for combo in itertools.product(*(values[k] for k in keys))]


def parse_method(spec: str) -> MethodConfig:
    """One config from ``name:key=value,...`` (a single value per key)."""
    configs = parse_sweep(spec)
    if len(configs) != 1:
        raise ValueError(f"{spec!r} describes {len(configs)} settings; give one value per key")
    return configs[0]


#: The knob that sets a method's budget, shown by :func:`describe` even at its default: the
#: first of these that the config has.
BUDGET_KNOBS = ("p", "budget", "window")


def describe(cfg: MethodConfig) -> str:
    """The inverse of :func:`parse_method`: the budget knob and every non-default field.

    Examples
    --------
    >>> from nucleus_attn import Twilight
    >>> describe(Twilight(base_budget=0.5))
    'twilight:p=0.9,base_budget=0.5'
    """
    default = type(cfg)()
    knob = next((k for k in BUDGET_KNOBS if hasattr(cfg, k)), None)
    shown = [f"{k}={v}" for k, v in vars(cfg).items() if k == knob or getattr(default, k) != v]
    return cfg.name + (":" + ",".join(shown) if shown else "")
