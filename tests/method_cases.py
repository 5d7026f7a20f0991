"""The table every generic method test reads: per registered method, an easy and a hard
setting, and the setting that must reduce to dense attention."""

from __future__ import annotations

from typing import Any

# name -> {"easy": params, "hard": params, "full": params that must equal dense}
METHOD_CASES: dict[str, dict[str, dict[str, Any]]] = {
    "dense": {"easy": {}, "hard": {}, "full": {}},
    "oracle-topk": {"easy": {"budget": 0.5}, "hard": {"budget": 8}, "full": {"budget": 1.0}},
    "oracle-topp": {"easy": {"p": 0.99}, "hard": {"p": 0.5}, "full": {"p": 1.0}},
    "streaming": {"easy": {"sink": 4, "window": 0.5}, "hard": {"sink": 1, "window": 8},
                  "full": {"window": 1.0}},
    "quest": {"easy": {"budget": 0.5}, "hard": {"budget": 32, "page_size": 8},
              "full": {"budget": 1.0}},
    "twilight": {"easy": {"p": 0.99}, "hard": {"p": 0.6, "base_budget": 0.1},
                 "full": {"p": 1.0}},
    "tactic": {"easy": {"p": 0.99}, "hard": {"p": 0.6, "cluster_size": 8, "iterations": 3},
               "full": {"p": 1.0}},
}

# Further settings of one method that generic tests sweep besides its easy/hard rows: one per
# Twilight base, with real pruning (hard-ish p) on small caches. Sizes are small enough for
# caches of ~30 tokens (the tiny-model tests): pages of 8, clusters of 4.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "twilight": [
        {"base": "quest", "p": 0.7, "base_budget": 0.5, "page_size": 8},
        {"base": "dense", "p": 0.7},
        {"base": "cluster", "p": 0.7, "base_budget": 0.5, "cluster_size": 4, "iterations": 3},
    ],
}


def variant_cases() -> list[tuple[str, dict[str, Any]]]:
    """``(method, params)`` for every entry of :data:`VARIANTS`."""
    return [(name, params) for name, rows in VARIANTS.items() for params in rows]
