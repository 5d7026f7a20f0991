"""Our attention inside ``torch.compile``: one opaque custom op per attention layer.

When transformers' decode step is compiled (``enable(..., compile=True)``, or a user's own
``torch.compile`` of the model), dynamo does not trace into the method's Python (per-layer
state, host-side decisions, Triton launchers): the attention function becomes one call of
the custom op ``torch.ops.nucleus_attn.attend``, which runs our eager code
(:meth:`~nucleus_attn.integrations.hf.SparseDecodeHandle._attend`) when the compiled graph
runs, and whose kernels a CUDA graph (``mode="reduce-overhead"``) captures like any others.
Everything around it (projections, norms, rotary, residuals, MLP) is compiled and fused by
inductor. The op has a fake (shape-only) implementation, so tracing needs no data.

The op finds the handle through a small integer key that each attention module of a model
keeps (set once, never changed), so that enabling another method on the same model reuses
the compiled graph instead of compiling again.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import Tensor, nn

#: Attribute holding the model key on every attention module of an enabled model.
KEY_ATTR = "_nucleus_attn_key"

_KEYS = itertools.count(1)
# whether compiled steps of an enable(compile=...) handle ran on a GPU since the last reset
# (then they recorded CUDA graphs that replay our op's kernels: see hf._reset_graphs)
_RECORDED = [False]
# model key -> the handle enabled on that model now (none: plain SDPA)
_HANDLES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def register(handle: Any, modules: list[nn.Module]) -> int:
    """Attach ``handle`` to its model's key (made on first use) and return the key."""
    key = next((getattr(m, KEY_ATTR) for m in modules if hasattr(m, KEY_ATTR)), None)
    if key is None:
        key = next(_KEYS)
        for m in modules:
            object.__setattr__(m, KEY_ATTR, key)  # a plain attribute, not a submodule
    _HANDLES[key] = handle
    return key


def unregister(key: int, handle: Any) -> None:
    if _HANDLES.get(key) is handle:
        del _HANDLES[key]


def take_recorded() -> bool:
    """Whether compiled steps recorded CUDA graphs since the last call (and clear it)."""
    ran, _RECORDED[0] = _RECORDED[0], False
    return ran


@torch.library.custom_op("nucleus_attn::attend", mutates_args=())
def attend_op(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, model: int,
              layer: int, dropout: float, scaling: float | None,
              sliding_window: int | None) -> Tensor:
    """``[B, q_len, Hq, d]``: the handle's attention for one layer (see module doc)."""
    handle = _HANDLES.get(model)
    kwargs = {} if sliding_window is None else {"sliding_window": sliding_window}
    if handle is None or not handle.enabled:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        module = _Shim(layer, scaling, query.shape[1] // key.shape[1])
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                      scaling=scaling, **kwargs)[0]
    # from now on, prefill rebuilds the metadata in place: replayed graphs read it there
    handle.compiled = True
    if query.is_cuda and handle.compile_mode:
        _RECORDED[0] = True
    module = handle._module_of[layer]
    out, _ = handle._attend(module, query, key, value, mask, dropout, scaling, kwargs)
    return out


@attend_op.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, model: int, layer: int,
      dropout: float, scaling: float | None, sliding_window: int | None) -> Tensor:
    b, hq, q_len, _ = query.shape
    return query.new_empty(b, q_len, hq, value.shape[-1])


class _Shim(nn.Module):
    """What transformers' SDPA function reads from an attention module."""

    def __init__(self, layer: int, scaling: float | None, groups: int) -> None:
        super().__init__()
        self.layer_idx = layer
        self.is_causal = True
        self.num_key_value_groups = groups
        if scaling is not None:
            self.scaling = scaling


def attend(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
           mask: Tensor | None, dropout: float, scaling: float | None,
           kwargs: dict[str, Any]) -> tuple[Tensor, None]:
    """The attention function's body while dynamo traces: one call of the custom op."""
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"nucleus_attn: layer {module.layer_idx} soft-caps its attention logits, which "
            "SDPA and the sparse methods do not support; disable sparse decode for this model")
    out = torch.ops.nucleus_attn.attend(query, key, value, mask, getattr(module, KEY_ATTR),
                                        module.layer_idx, float(dropout), scaling,
                                        None if window is None else int(window))
    return out, None
