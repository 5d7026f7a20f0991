"""The crossover rule: below a context length, a sparse layer's decode step runs dense.

Selection has a fixed cost (a few dependent kernel launches and a pass over the method's
metadata) while dense decode attention costs time in proportion to N, so below some
context length every sparse method is slower than dense attention. Each method config
has ``dense_below`` (tokens): a decode step whose cache length N is below it computes
dense attention (exactly; the kept fraction reported is 100%) instead of selecting.

- ``dense_below=None`` (the default): the value in :data:`DENSE_BELOW` for this GPU and
  method, or 0 (never dense) where the table has none; not applied in diagnostics mode
  (``diagnostics=True``, the accuracy studies), which runs the method as configured.
- ``dense_below=0``: never; ``dense_below=n``: below n tokens, always (diagnostics too).

N is the padded cache length, a Python int: the rule needs no host sync and a CUDA
graph captured for one N replays the same branch.
"""

from __future__ import annotations

import functools

import torch

#: Context length (tokens) below which a method's decode step runs dense, per GPU (the
#: label :func:`gpu_label` gives) and method. PROVISIONAL: read off the committed
#: whole-model benchmark (results/bench_e2e_h200.json, Llama-3-8B shape, B = 1/4/8,
#: N = 4k/32k/128k, measured with the selection kernels from before the split kernels):
#: the smallest N of that run at which the method was faster than dense at some batch.
#: ``nucleus-attn bench kernels`` prints, per method, the smallest N of its run where the
#: method beats dense; re-measure with the current kernels and update these values.
#: Methods absent from a GPU's entry have no crossover there (Tactic never beat dense in
#: that run, so no length could be read off).
DENSE_BELOW: dict[str, dict[str, int]] = {
    "h200": {"quest": 32768, "twilight": 131072, "streaming": 32768},
}

KNOWN_GPUS = ("h100", "h200", "h20", "a100", "l40s", "l4", "a10g", "b200", "gh200")


def gpu_label(device: torch.device) -> str:
    """Short name of a device's GPU (``"h200"``, ``"a100"``, ...; ``"cpu"`` off a GPU)."""
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gpu_label(index)


@functools.cache
def _gpu_label(index: int) -> str:
    name = torch.cuda.get_device_name(index).lower()
    for known in KNOWN_GPUS:
        if known in name.replace(" ", ""):
            return known
    return "".join(c if c.isalnum() else "_" for c in name)


def default_dense_below(method: str, device: torch.device) -> int:
    """The table's crossover for ``method`` on ``device`` (0 when it has none)."""
    return DENSE_BELOW.get(gpu_label(device), {}).get(method, 0)


def dense_below(cfg: object, device: torch.device, diagnostics: bool = False) -> int:
    """The context length below which ``cfg``'s decode steps run dense on ``device``."""
    value = getattr(cfg, "dense_below", None)
    if value is not None:
        return int(value)
    if diagnostics:
        return 0
    return default_dense_below(getattr(cfg, "name", ""), device)


def check_dense_below(name: str, value: object) -> None:
    """``ValueError`` unless ``value`` is None or an int >= 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name}: dense_below={value!r} must be None (the GPU's default crossover), 0 "
            "(never run dense) or a context length in tokens below which decode steps run "
            "dense attention"
        )
