"""Sparse decode on a model split with transformers' own tensor parallelism (``tp_plan``).

transformers' tensor-parallel plan for the supported decoders shards ``q_proj``, ``k_proj``
and ``v_proj`` by output columns and ``o_proj`` by input rows. When the head counts divide
by the world size, each rank therefore holds whole KV heads and their query groups, and
the attention function receives plain local tensors (``[B, Hq / W, ...]`` and
``[B, Hkv / W, ...]``). Key selection is per KV head, so every rank runs the method on its
own heads with no extra communication; the all-reduce after ``o_proj`` is transformers'.

When a head count does not divide, transformers still loads the model but cuts a head
between ranks (the last shard is shorter), and the first forward fails deep in the model
with a reshape error. :func:`check_tensor_parallel` turns that into a clear error at
:func:`~nucleus_attn.integrations.hf.enable`.
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["check_tensor_parallel", "load_tensor_parallel", "tp_world_size"]


def _mesh_tp_size(mesh: Any) -> int:
    """The size of the ``tp`` dimension of a device mesh (a 1-D mesh is all ``tp``)."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "tp" in names:
        return int(mesh.size(names.index("tp")))
    if getattr(mesh, "ndim", 0) == 1:
        return int(mesh.size())
    return 1


def tp_world_size(model: Any) -> int:
    """How many tensor-parallel ranks share ``model``'s heads; 1 when it is not split.

    transformers 5.x records the degree as ``model.tp_size`` (``_tp_size``, set by
    ``from_pretrained`` with a TP plan) and the mesh as ``model._device_mesh``; the mesh
    is read only when the size is missing. The process group's world size is not used:
    a data-parallel run has many processes and no split heads.
    """
    for attr in ("tp_size", "_tp_size"):
        size = getattr(model, attr, None)
        if isinstance(size, int) and size > 0:
            return size
    mesh = getattr(model, "_device_mesh", None)
    return _mesh_tp_size(mesh) if mesh is not None else 1


def check_tensor_parallel(model: Any) -> None:
    """Raise unless every rank of a tensor-parallel ``model`` holds whole heads.

    Sparse decode selects keys per KV head, and transformers splits a head between ranks
    when a head count does not divide by the world size (its forward then fails with a
    reshape error). A model on one device passes.

    Raises
    ------
    ValueError
        ``num_key_value_heads`` or ``num_attention_heads`` is not divisible by the
        tensor-parallel world size; the message names the world sizes that work.
    """
    world = tp_world_size(model)
    if world <= 1:
        return
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    q_heads = int(getattr(config, "num_attention_heads", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or q_heads)
    uneven = [f"{name}={n}" for name, n in (("num_key_value_heads", kv_heads),
                                             ("num_attention_heads", q_heads)) if n % world]
    if not uneven:
        return
    common = math.gcd(q_heads, kv_heads)
    sizes = [d for d in range(2, common + 1) if common % d == 0]
    fix = (f"use a tensor-parallel world size that divides both (torchrun --nproc-per-node "
           f"{' or '.join(map(str, sizes))}), or load the model on one device"
           if sizes else "load the model on one device, without tp_plan")
    raise ValueError(
        f"nucleus_attn: {type(model).__name__} is split over {world} tensor-parallel ranks, "
        f"but {' and '.join(uneven)} is not divisible by {world}: transformers would cut a "
        f"head between ranks, and sparse decode selects keys per whole KV head "
        f"({kv_heads} KV heads, {q_heads} query heads); {fix}"
    )


def load_tensor_parallel(path: str | os.PathLike[str], *, model_class: Any = None,
                         tp_plan: str | dict[str, str] = "auto", **kwargs: Any) -> Any:
    """``from_pretrained`` with transformers' tensor-parallel plan, on any transformers 5.x.

    Newer releases take ``distributed_config=DistributedConfig(tp_plan=...)`` and warn on
    the bare ``tp_plan`` argument; older ones only know ``tp_plan``. Run under ``torchrun``:
    transformers starts the process group (NCCL on GPUs, gloo on CPU).

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint directory or hub id.
    model_class : type, optional
        The class to load with (default ``transformers.AutoModelForCausalLM``).
    tp_plan : str or dict
        ``"auto"`` (the model's own plan, default) or an explicit plan.
    **kwargs
        Passed to ``from_pretrained`` (``dtype``, ...).
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    try:
        from transformers.distributed import DistributedConfig

        distributed = DistributedConfig(tp_plan=tp_plan)
    except (ImportError, TypeError):  # no DistributedConfig, or one without tp_plan
        return model_class.from_pretrained(path, tp_plan=tp_plan, **kwargs)
    return model_class.from_pretrained(path, distributed_config=distributed, **kwargs)
