"""nucleus-attn: adaptive (top-p) sparse decode attention for long-context LLMs.

Each decode step keeps, per KV head, only the keys that matter: a fixed budget (Quest,
StreamingLLM, oracle top-k) or the smallest set reaching an attention mass ``p``
(Twilight, Tactic, oracle top-p).

Examples
--------
>>> import torch, nucleus_attn as na
>>> q, k, v = torch.randn(2, 8, 64), torch.randn(2, 2, 4099, 64), torch.randn(2, 2, 4099, 64)
>>> out, info = na.sparse_decode(q, k, v, method="twilight", p=0.9)
>>> na.methods()[:3]
['dense', 'oracle-topk', 'oracle-topp']
"""

from .decode import DecodeInfo, decode_step, new_state, sparse_decode
from .methods import DenseConfig as Dense
from .methods import MethodConfig, describe, make_config, methods, parse_method, parse_sweep
from .methods import OracleTopKConfig as OracleTopK
from .methods import OracleTopPConfig as OracleTopP
from .methods import QuestConfig as Quest
from .methods import StreamingConfig as Streaming
from .methods import TacticConfig as Tactic
from .methods import TwilightConfig as Twilight
from .span import KeySpan

__version__ = "0.1.0"


def __getattr__(name: str):
    # enable() and disable() need transformers: imported on first use, so `import
    # nucleus_attn` does not
    if name in ("enable", "disable"):
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DecodeInfo",
    "Dense",
    "KeySpan",
    "MethodConfig",
    "OracleTopK",
    "OracleTopP",
    "Quest",
    "Streaming",
    "Tactic",
    "Twilight",
    "decode_step",
    "describe",
    "disable",
    "enable",
    "make_config",
    "methods",
    "new_state",
    "parse_method",
    "parse_sweep",
    "sparse_decode",
]
