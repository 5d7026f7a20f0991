"""The crossover rule: below a context length, a sparse layer's decode step runs dense.

Selection has a fixed cost (a few dependent kernel launches and a pass over the method's
metadata) while dense decode attention costs time in proportion to N, so below some
context length every sparse method is slower than dense attention. Each method config
has ``dense_below`` (tokens): a decode step whose cache length N is below it computes
dense attention (exactly; the kept fraction reported is 100%) instead of selecting.

- ``dense_below=None`` (the default): the value in :data:`DENSE_BELOW` for this GPU,
  method and batch size, or 0 (never dense) where the table has none; not applied in
  diagnostics mode (``diagnostics=True``, the accuracy studies), which runs the method as
  configured.
- ``dense_below=0``: never; ``dense_below=n``: below n tokens, always (diagnostics too).

N (the padded cache length) and B are Python ints: the rule needs no host sync and a
CUDA graph captured for one N replays the same branch.
"""

from __future__ import annotations

import functools

import torch

#: Context length (tokens) below which a method's decode step runs dense, per GPU (the
#: label :func:`gpu_label` gives), method and batch size. An entry is an int (every batch)
#: or ``{batch: length}``: a batch B takes the entry of the largest listed batch <= B (the
#: crossover falls as the batch grows: dense attention costs B times more, selection much
#: less). A key ``"name:field=value"`` applies to configs with that field value and comes
#: before the plain name.
#:
#: h200: MEASURED per layer with ``nucleus-attn bench kernels --n 8192 32768 131072 --batch 1
#: 8 --fractions 0.01 --methods dense quest twilight tactic --profile 131072 8`` (2026-12-04,
#: results/bench_kernels_h200.json, after the binned top-p kernels): the smallest N of that
#: grid where the method beat our dense decode. Twilight p=0.9, dense base: 1.46x at
#: 128k x 1 (0.82x at 32k x 1), 1.58x at 32k x 8 (0.93x at 8k x 8); Quest base: 1.05x at
#: 128k x 1 (0.47x at 32k), 1.55x at 32k x 8 (0.80x at 8k); cluster base: never at B=1,
#: 1.10x at 128k x 8 (0.59x at 32k); Tactic p=0.9: 1.19x at 128k x 1 (0.56x at 32k), 1.55x
#: at 32k x 8 (0.74x at 8k); Quest 1%: 1.89x at 128k x 1 (0.98x at 32k), 2.23x already at
#: 8k x 8 (4k x 8: 1.70x in the grid of 2026-12-01, whose 4096 entry is kept). "Never up to
#: 128k" is entered as 262144, the next length, not measured. COARSE: the grid has three
#: lengths, so a method that wins at 128k x 1 but lost at 32k runs dense up to 128k.
#: Streaming's values are PROVISIONAL, from the whole-model results/bench_e2e_h200.json
#: (faster than dense from 32k at B=1 and B=4, from 4k at B=8). Methods absent from a
#: GPU's entry have no crossover there.
DENSE_BELOW: dict[str, dict[str, int | dict[int, int]]] = {
    "h200": {
        "quest": {1: 131072, 8: 4096},
        "twilight": {1: 131072, 8: 32768},
        "twilight:base=dense": {1: 131072, 8: 32768},
        "twilight:base=cluster": {1: 262144, 8: 131072},
        "tactic": {1: 131072, 8: 32768},
        "streaming": {1: 32768, 8: 4096},
    },
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


def default_dense_below(cfg: object, device: torch.device, batch: int = 1) -> int:
    """The table's crossover for the method of ``cfg`` on ``device`` at ``batch`` (0 when
    the table has none)."""
    entries = DENSE_BELOW.get(gpu_label(device), {})
    name = getattr(cfg, "name", cfg if isinstance(cfg, str) else "")
    entry = None
    for key, value in entries.items():  # "name:field=value" first
        head, _, cond = key.partition(":")
        if head == name and cond:
            field, _, want = cond.partition("=")
            if str(getattr(cfg, field, None)) == want:
                entry = value
                break
    if entry is None:
        entry = entries.get(name, 0)
    if isinstance(entry, dict):
        listed = [bb for bb in entry if bb <= batch]
        return entry[max(listed)] if listed else entry[min(entry)]
    return int(entry)


def dense_below(cfg: object, device: torch.device, diagnostics: bool = False,
                batch: int = 1) -> int:
    """The context length below which ``cfg``'s decode steps run dense on ``device``."""
    value = getattr(cfg, "dense_below", None)
    if value is not None:
        return int(value)
    if diagnostics:
        return 0
    return default_dense_below(cfg, device, batch)


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
