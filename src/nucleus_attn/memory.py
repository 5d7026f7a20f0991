"""Memory of each method's metadata: measured on live states, and accounted per token.

Sparse decode trades compute for metadata kept next to the KV cache (page bounds, 4-bit
keys, clusters). Two views of its size are given here, so that one checks the other:

- :func:`state_bytes` measures what a live state holds, by walking its tensors and summing
  the storages they keep alive (each storage once, whatever part of it is in use);
- :func:`bytes_per_token` is the analytic account, per cached token and layer, of the
  layout the methods use (it follows :mod:`nucleus_attn.methods` and the ops they call),
  and :func:`memory_table` turns it into totals for a model shape.

A live state holds more than the account by rounding (whole pages, whole segments of
clusters) and, after ``extend``, by the spare capacity of :func:`~.methods.base.grow`,
which doubles a buffer when it is full: at most twice the bytes in use.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .methods import MethodConfig, describe, make_config, spec_of

#: Key of the KV cache's own bytes in :func:`bytes_per_token` (not part of the metadata).
KV_CACHE = "kv_cache"

# leaves that never hold tensors: skipped without looking inside
_ATOMS = (str, bytes, int, float, complex, bool, torch.dtype, torch.device, type,
          types.ModuleType, types.FunctionType, types.MethodType)


# --- measured ----------------------------------------------------------------------------

def tensor_bytes(obj: Any, *, exclude: Iterable[Any] = ()) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``.

    Follows dataclass fields and other attributes (``vars``, ``__slots__``, cached
    properties included), dict keys and values, and list/tuple/set items, recursively.
    Counts ``untyped_storage().nbytes()`` once per storage: a view keeps its whole base
    alive, and two views of one buffer cost it once. ``torch.nn.Module`` objects (model
    weights) and the objects in ``exclude`` (matched by identity) are not entered; meta
    tensors hold no memory.

    Parameters
    ----------
    obj : object
        Where to start (a method state, a handle, a cache).
    exclude : iterable
        Objects to skip, e.g. the method states when measuring everything else.

    Returns
    -------
    int
        Bytes held, on any device.
    """
    skip = {id(x) for x in exclude if x is not None}
    seen: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, _ATOMS) or id(o) in seen or id(o) in skip:
            continue
        seen.add(id(o))
        if isinstance(o, Tensor):
            if o.device.type != "meta":
                st = o.untyped_storage()
                storages[(str(o.device), st.data_ptr())] = st.nbytes()
            continue
        if isinstance(o, nn.Module):
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
            continue
        if isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
            continue
        stack.extend(getattr(o, "__dict__", {}).values())
        for cls in type(o).__mro__:
            for name in getattr(cls, "__slots__", ()):
                stack.append(getattr(o, name, None))
    return sum(storages.values())


def state_bytes(state: Any) -> int:
    """Bytes held by one method state (0 for None, the state of stateless methods).

    Nested states (``TwilightState.pages`` and ``.keys``) are walked too; spare capacity
    left by ``extend`` counts, since it is allocated.
    """
    return tensor_bytes(state)


def handle_state_bytes(handle: Any) -> int:
    """Bytes of the method states of every layer of a :class:`~.integrations.hf.SparseDecodeHandle`.

    Read-only; states are dropped when a new sequence starts and by ``disable()``, so
    read it right after ``generate`` returns.
    """
    return tensor_bytes([layer.state for layer in handle._layers.values()])


# --- accounted ---------------------------------------------------------------------------

def _itemsize(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def _page_bounds(page_size: int, d: int, isz: int) -> dict[str, float]:
    # PageState.kmin and .kmax: [P, d] in the keys' dtype, P = ceil(N / page_size)
    return {"page_min_max": 2 * d * isz / page_size}


def _quest(cfg: Any, d: int, isz: int) -> dict[str, float]:
    return _page_bounds(cfg.page_size, d, isz)


def _clusters(cfg: Any, d: int, isz: int) -> dict[str, float]:
    # ClusterState (from a TacticConfig's clustering fields): centroids [C, d] in the keys'
    # dtype, sizes and offsets [C] int64, spread [C] float32 (C is about N / cluster_size +
    # outliers * N: K-means clusters plus the singleton outliers), labels [N] int64,
    # members [N] int32
    per = 1.0 / cfg.cluster_size + cfg.outliers  # clusters per token
    i64, i32 = torch.int64.itemsize, torch.int32.itemsize
    return {"centroids": d * isz * per, "cluster_sizes": i64 * per,
            "cluster_offsets": i64 * per, "cluster_spread": torch.float32.itemsize * per,
            "labels": float(i64), "members": float(i32)}


def _twilight(cfg: Any, d: int, isz: int) -> dict[str, float]:
    # Int4Keys: two codes a byte (uint8 [N, d/2]); scale and zero [N] in the keys' dtype;
    # plus the base's metadata: page bounds (quest), clusters (cluster), none (dense)
    out = {"int4_codes": d / 2, "int4_scale": float(isz), "int4_zero": float(isz)}
    if cfg.base == "quest":
        out.update(_page_bounds(cfg.page_size, d, isz))
    elif cfg.base == "cluster":
        out.update(_clusters(cfg.cluster_config(), d, isz))
    return out


def _tactic(cfg: Any, d: int, isz: int) -> dict[str, float]:
    return _clusters(cfg, d, isz)


#: Per-method account of the metadata bytes a token costs per KV head, from
#: ``(config, head_dim, itemsize of the keys)``. Methods without state need no entry.
ACCOUNTS: dict[str, Callable[[Any, int, int], dict[str, float]]] = {
    "quest": _quest,
    "twilight": _twilight,
    "tactic": _tactic,
}


def bytes_per_token(cfg: MethodConfig | str, *, head_dim: int, dtype: torch.dtype | str,
                    kv_heads: int = 1) -> dict[str, float]:
    """Extra bytes a method keeps per cached token and layer, itemised, and the KV cache's.

    The account of the layout the code uses, amortised per token: per-page and
    per-cluster items are divided by the page or cluster size. It leaves out rounding to
    whole pages or cluster segments and the spare capacity of growing buffers (up to
    twice the bytes in use; see the module docstring).

    Parameters
    ----------
    cfg : MethodConfig or str
        The method (a name means its default parameters).
    head_dim : int
        d, the size of a key.
    dtype : torch.dtype or str
        The KV cache's dtype (page bounds, int4 scales and centroids are kept in it).
    kv_heads : int
        KV heads per layer; every item is per head times this.

    Returns
    -------
    dict of str to float
        One entry per metadata item (none for dense, oracle and streaming, which keep
        nothing), plus :data:`KV_CACHE`: ``2 * d * itemsize * kv_heads``, the keys and
        values themselves, for comparison.

    Examples
    --------
    >>> bytes_per_token("quest", head_dim=128, dtype=torch.bfloat16)
    {'page_min_max': 32.0, 'kv_cache': 512.0}
    """
    cfg = make_config(cfg) if isinstance(cfg, str) else cfg
    isz = _itemsize(dtype)
    account = ACCOUNTS.get(cfg.name)
    if account is None:
        if spec_of(cfg).new_state is not None:
            raise ValueError(f"{cfg.name} keeps a state but has no memory account; add one "
                             "to nucleus_attn.memory.ACCOUNTS")
        items: dict[str, float] = {}
    else:
        items = account(cfg, head_dim, isz)
    items[KV_CACHE] = float(2 * head_dim * isz)
    return {k: v * kv_heads for k, v in items.items()}


def metadata_per_token(items: dict[str, float]) -> float:
    """The metadata total of a :func:`bytes_per_token` result (without the KV cache)."""
    return float(sum(v for k, v in items.items() if k != KV_CACHE))


def memory_table(cfgs: Iterable[MethodConfig | str], *, head_dim: int,
                 dtype: torch.dtype | str, kv_heads: int, layers: int,
                 tokens: int) -> list[dict[str, Any]]:
    """The metadata account of several methods for a model shape and a number of tokens.

    Parameters
    ----------
    cfgs : iterable of MethodConfig or str
        Methods (names mean default parameters).
    head_dim, dtype, kv_heads : int, torch.dtype or str, int
        The model's attention shape and KV cache dtype.
    layers : int
        Layers that run the method (dense and sliding-window layers keep no metadata).
    tokens : int
        Cached tokens, summed over the batch.

    Returns
    -------
    list of dict
        Per method: ``method`` (its spec), ``items`` (bytes per token and layer, all KV
        heads), ``bytes_per_token_layer`` (their sum), ``kv_bytes_per_token_layer``,
        ``ratio`` (metadata over KV cache), ``metadata_bytes`` and ``kv_cache_bytes``
        (totals over ``layers`` and ``tokens``).
    """
    rows = []
    for cfg in cfgs:
        cfg = make_config(cfg) if isinstance(cfg, str) else cfg
        items = bytes_per_token(cfg, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)
        kv = items.pop(KV_CACHE)
        meta = float(sum(items.values()))
        rows.append({
            "method": describe(cfg),
            "items": items,
            "bytes_per_token_layer": meta,
            "kv_bytes_per_token_layer": kv,
            "ratio": meta / kv,
            "metadata_bytes": meta * layers * tokens,
            "kv_cache_bytes": kv * layers * tokens,
        })
    return rows
