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
