"""Running method settings over eval samples on a model: accuracy and perplexity cells.

Prefill is dense for every method, so each batch of prompts is prefilled once (all but
its last token) and every method setting decodes from a copy of that cache: the first
sparse step is the prompt's last token, then greedy generation of the answer. Each cell
records the budget that bought its accuracy, from the integration's diagnostics: mean
kept fraction of the sparse layers, its spread over layers and KV heads, a layer x head
matrix, and the exact attention mass kept.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods import MethodConfig, describe

Row = dict[str, Any]


@dataclass
class CellStats:
    """Budget statistics of one cell, accumulated over batches (weighted by decode rows)."""

    rows: int = 0
    kept: float = 0.0
    kept_all: float = 0.0
    mass: float = 0.0
    mass_min: float = 1.0
    layer_head_kept: list[list[float]] | None = None
    layer_head_mass: list[list[float]] | None = None
    sparse_layers: list[int] = field(default_factory=list)

    def add(self, summary: dict[str, Any]) -> None:
        rows = summary["decode_rows"]
        if not rows:
            return
        sparse = [ly for ly in summary["per_layer"] if not ly["dense"]]
        kept = summary.get("sparse_kept_fraction")
        mass = summary.get("sparse_mass")
        self.kept += rows * (1.0 if kept is None else kept)
        self.kept_all += rows * summary["mean_kept_fraction"]
        self.mass += rows * (1.0 if mass is None else mass)
        for ly in sparse:
            for m in ly.get("mass_per_head") or []:
                self.mass_min = min(self.mass_min, m)
        kmat = [ly["kept_fraction_per_head"] for ly in sparse]
        mmat = [ly.get("mass_per_head") or [] for ly in sparse]
        self.layer_head_kept = _acc(self.layer_head_kept, kmat, rows)
        self.layer_head_mass = _acc(self.layer_head_mass, mmat, rows)
        self.sparse_layers = [ly["layer"] for ly in sparse]
        self.rows += rows

    def as_row(self) -> Row:
        r = max(self.rows, 1)
        kmat = [[x / r for x in row] for row in self.layer_head_kept or []]
        flat = [x for row in kmat for x in row]
        mean = sum(flat) / len(flat) if flat else 1.0
        std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat)) if flat else 0.0
        return {
            "kept_fraction": self.kept / r,  # sparse layers only
            "kept_fraction_all_layers": self.kept_all / r,  # dense layers count as 1
            "kept_fraction_std": std,  # spread of per-(layer, KV head) means
            "mass": self.mass / r,
            "mass_min": self.mass_min,  # lowest per-head mean over the cell's batches
            "layer_head_kept": kmat,
            "layer_head_mass": [[x / r for x in row] for row in self.layer_head_mass or []],
            "sparse_layers": self.sparse_layers,
            "decode_rows": self.rows,
        }


def _acc(total: list[list[float]] | None, mat: list[list[float]], w: int) -> list[list[float]]:
    if total is None:
        return [[w * x for x in row] for row in mat]
    return [[a + w * x for a, x in zip(ra, rm, strict=True)] for ra, rm in zip(total, mat,
                                                                             strict=True)]


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def cache_kwarg(model: Any) -> str:
    """Name of forward's cache argument: ``cache`` from transformers 5.24, else the old one."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """Dense prefill of every token but the last; returns the cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True,
              position_ids=_positions(mask[:, :-1]), **{cache_kwarg(model): cache})
    return cache


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def generate_from(model: Any, cache: Any, ids: torch.Tensor, mask: torch.Tensor,
                  new_tokens: int, eos: int | None) -> torch.Tensor:
    """Greedy continuation of ``ids`` whose first ``len - 1`` tokens are in ``cache``.

    A plain loop (not ``generate``) so that each step is exactly one decode call with
    explicit positions for left-padded rows. Returns ``[B, new_tokens]`` token ids.
    """
    b = ids.shape[0]
    cache_arg = {cache_kwarg(model): cache}
    tok = ids[:, -1:]
    pos = _positions(mask)[:, -1:]
    out = []
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=tok, attention_mask=mask, use_cache=True,
                           position_ids=pos, **cache_arg).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            out.append(tok)
            if eos is not None:
                done |= tok[:, 0] == eos
                if bool(done.all()):
                    break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            pos = pos + 1
    return torch.cat(out, dim=1)


def run_cells(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    new_tokens: int,
    configs: list[MethodConfig],
    *,
    dense_layers: int,
    batch_size: int,
    judge: Callable[[int, str], bool],
    on_batch: Callable[[], None] | None = None,
    on_prefill: Callable[[int, torch.Tensor, torch.Tensor, Any], None] | None = None,
    on_cell: Callable[[], Any] | None = None,
) -> dict[str, tuple[int, CellStats, float]]:
    """Correct answers, budget statistics and seconds per method setting over ``prompts``.

    ``judge(i, text)`` says whether the text generated for prompt ``i`` is right.
    ``on_batch()`` runs after each batch, ``on_cell()`` after each batch's decode under
    each setting (a progress bar's unit).
    ``on_prefill(start, ids, mask, cache)`` (optional) sees each batch's dense prefill
    (prompts ``start ..``, left-padded ids and mask, the cache of all but the last token)
    before any method decodes from it; it must not modify the cache (copy it).
    """
    from ..integrations.hf import enable

    device = next(model.parameters()).device
    results = {describe(c): [0, CellStats(), 0.0] for c in configs}
    for start, chunk in zip(range(0, len(prompts), batch_size), _batches(prompts, batch_size),
                            strict=True):
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        base = prefill(model, ids, mask)
        if on_prefill is not None:
            on_prefill(start, ids, mask, base)
        for cfg in configs:
            cell = results[describe(cfg)]
            t0 = time.perf_counter()
            cache = copy.deepcopy(base)
            with enable(model, cfg, dense_layers=dense_layers, diagnostics=True) as handle:
                gen = generate_from(model, cache, ids, mask, new_tokens, tokenizer.eos_token_id)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                cell[2] += time.perf_counter() - t0
                cell[1].add(handle.summary())
            texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
            cell[0] += sum(judge(start + i, t) for i, t in enumerate(texts))
            del cache
            if on_cell is not None:
                on_cell()
        if on_batch is not None:
            on_batch()
    return {k: (v[0], v[1], v[2]) for k, v in results.items()}


def perplexity_cells(
    model: Any,
    windows: list[tuple[list[int], list[int]]],
    configs: list[MethodConfig],
    *,
    dense_layers: int,
    on_window: Callable[[], None] | None = None,
) -> dict[str, tuple[float, int, CellStats]]:
    """Mean negative log-likelihood of each window's continuation, decoded token by token.

    Each window is (prefix ids, continuation ids); the prefix is prefilled densely once,
    then every continuation token is one (sparse) decode step, teacher-forced.
    """
    from ..integrations.hf import enable

    device = next(model.parameters()).device
    out = {describe(c): [0.0, 0, CellStats()] for c in configs}
    for prefix, cont in windows:
        ids = torch.tensor([prefix + cont], device=device)
        mask = torch.ones_like(ids)
        p = len(prefix)
        base = prefill(model, ids[:, :p], mask[:, :p])  # positions 0 .. p-2
        for cfg in configs:
            cell = out[describe(cfg)]
            cache = copy.deepcopy(base)
            nll = 0.0
            cache_arg = {cache_kwarg(model): cache}
            with enable(model, cfg, dense_layers=dense_layers, diagnostics=True) as handle, \
                    torch.no_grad():
                for t in range(len(cont)):
                    pos = torch.tensor([[p - 1 + t]], device=device)
                    logits = model(input_ids=ids[:, p - 1 + t:p + t],
                                   attention_mask=mask[:, :p + t], use_cache=True,
                                   position_ids=pos, **cache_arg).logits[0, -1]
                    nll -= torch.log_softmax(logits.float(), -1)[cont[t]].item()
                cell[2].add(handle.summary())
            cell[0] += nll
            cell[1] += len(cont)
        if on_window is not None:
            on_window()
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}
