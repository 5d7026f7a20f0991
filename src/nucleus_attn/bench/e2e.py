"""``nucleus-attn bench e2e``: per-token decode latency of a whole model, dense vs each method.

A random-weight transformers Llama with Llama-3-8B's config (bf16) decodes from a static
cache filled with random K/V to the context length (no prefill: only the speed of decode is
measured). For every (context, batch) point, in one run and on the same model and cache:

- ``stock``: transformers' own ``sdpa`` attention with the static cache's 4D mask (what a
  user gets today: the mask is materialised and the KV heads repeated);
- ``dense``: our ``dense`` method through the same hook and cache as the sparse methods
  (our range kernel over the valid keys: no mask materialised, KV heads not repeated). Every
  speed-up is quoted against this row;
- ``no-attn``: the step with attention replaced by zeros, i.e. everything but attention.
  ``dense / no-attn`` is the Amdahl bound of any attention speed-up;
- each sparse method at fixed kept fractions. Random weights make attention nearly uniform,
  so top-p would keep almost everything: Quest and StreamingLLM get ``fraction * N`` tokens,
  Twilight on its default base (every key a candidate) and Tactic ``p = fraction`` (on
  near-uniform weights top-p keeps about that share), Twilight on the Quest base
  ``p = fraction / base_fraction`` over its candidates; the fraction each method actually
  kept is measured on an eager step and shown.

Each step is one CUDA graph (captured after two eager steps, replayed with the position and
mask advanced on the device). With ``--compile`` (the lean step) the whole forward is
compiled with ``torch.compile(fullgraph=True)`` first, for every row alike: inductor fuses
the norms, rotary embedding, residuals and MLP activation around the matmuls of each
decoder layer, and our attention is one opaque op per layer
(:mod:`nucleus_attn.integrations.compiled`); ``--compile-parts`` compiles only the RMSNorms,
the rotary embedding and the MLP (the previous step). A ``matmuls`` row applies every
weight matrix of the model once with plain ``F.linear`` in one graph: what the weights
alone cost. The byte floor of a step is the weights plus the KV (or the method's metadata
and kept rows) over the bandwidth measured in the same run.
"""

from __future__ import annotations

import inspect
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..memory import memory_table
from ..methods import MethodConfig, parse_method
from ..methods.base import resolve_budget
from .kernels import (
    Shape,
    bandwidths,
    capture_graph,
    floor_bytes,
    gpu_label,
    kernel_times,
    write_results,
)

#: Llama-3-8B's architecture (the weights are random).
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=262144, tie_word_embeddings=False)
#: A tiny Llama for the CPU smoke test.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096, tie_word_embeddings=False)
DENSE_LAYERS = 2  # the first layers stay dense under every method (as in the study)
TWILIGHT_BASE = 0.25  # the Quest base's budget (Twilight's default base_budget), of N
NONE_ATTN = "nucleus_attn_bench_none"
#: Twilight's mean kept fraction at p=0.95 in the accuracy study (results/eval, SmolLM2,
#: sparse layers, mean over passkey/multikey/multivalue), by context length.
STUDY_TWILIGHT_P95 = {4096: 0.040}
#: Below this Amdahl bound (attention under ~10% of the step) "% of bound" is not shown:
#: (speed-up - 1) / (bound - 1) divides by almost nothing.
MIN_BOUND = 1.1
#: A row whose kept fraction is beyond this factor of its target is flagged in the table.
OFF_TARGET = 1.5


@dataclass(frozen=True)
class Row:
    """One row of a point: a label, what runs, and the kept fraction it targets."""

    label: str
    kind: str  # "stock", "dense", "no-attn" or "method"
    spec: str = "dense"  # name:key=value of the method
    target: float = 1.0

    @property
    def config(self) -> MethodConfig:
        """The row's method; the crossover rule is off (``dense_below=0``) unless the spec
        sets it, so that a method row measures the method, not the rule."""
        cfg = parse_method(self.spec)
        return cfg.replace(dense_below=0) if cfg.dense_below is None else cfg


def method_rows(n: int, fractions: list[float], methods: list[str]) -> list[Row]:
    """The sparse rows of one context length (see the module docstring)."""
    rows = []
    for f in fractions:
        tokens = max(1, round(f * n))
        for m in methods:
            if m == "quest":
                rows.append(Row(f"quest {f:.1%}", "method", f"quest:budget={tokens}", f))
            elif m == "streaming":
                rows.append(Row(f"streaming {f:.1%}", "method",
                                f"streaming:sink=4,window={max(1, tokens - 4)}", f))
            elif m == "twilight":  # the default (dense) base, and the Quest base
                rows.append(Row(f"twilight {f:.1%}", "method", f"twilight:p={f:.4g}", f))
                p = min(1.0, f / TWILIGHT_BASE)
                rows.append(Row(f"twilight base=quest {f:.1%}", "method",
                                f"twilight:p={p:.4g},base=quest,"
                                f"base_budget={round(TWILIGHT_BASE * n)}", f))
            elif m == "tactic":
                rows.append(Row(f"tactic {f:.1%}", "method", f"tactic:p={f:.4g}", f))
            else:
                raise ValueError(f"bench e2e: unknown method {m!r}; choose from "
                                 "quest, streaming, twilight, tactic")
    study = STUDY_TWILIGHT_P95.get(n)
    if study is not None and "twilight" in methods:
        p = study / TWILIGHT_BASE
        rows.append(Row(f"twilight base=quest {study:.1%} (study p=0.95)", "method",
                        f"twilight:p={p:.4g},base=quest,base_budget={round(TWILIGHT_BASE * n)}",
                        study))
    return rows


# --- the model and its decode step ----------------------------------------------------------

def build_model(arch: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """A random-weight ``LlamaForCausalLM`` built directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**arch)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    return model.eval().requires_grad_(False)


@dataclass
class DecodeLoop:
    """A static cache holding ``ctx`` random tokens, and a decode step whose position and
    mask live on the device (so that one captured step can be replayed, each replay
    writing the next position)."""

    model: Any
    batch: int
    ctx: int
    headroom: int
    seed: int
    cache: Any = field(init=False)
    pos: Tensor = field(init=False)
    mask: Tensor = field(init=False)
    ids: Tensor = field(init=False)
    kwargs: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        from transformers import StaticCache

        from ..eval.runner import cache_kwarg

        cfg = self.model.config
        dev = self.model.device
        dtype = self.model.dtype
        length = self.ctx + self.headroom
        self.cache = StaticCache(config=cfg, max_cache_len=length)
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        shape = (self.batch, cfg.num_key_value_heads, self.ctx, cfg.head_dim)
        positions = torch.arange(self.ctx, device=dev)
        for layer in range(cfg.num_hidden_layers):
            k = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
            v = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
            self.cache.update(k, v, layer, {"cache_position": positions})
            del k, v
        self.pos = torch.tensor([self.ctx], device=dev)
        self.mask = torch.zeros(self.batch, 1, 1, length, dtype=torch.bool, device=dev)
        self.ids = torch.randint(0, cfg.vocab_size, (self.batch, 1), generator=gen, device=dev)
        self.kwargs = {cache_kwarg(self.model): self.cache}
        if "cache_position" in inspect.signature(self.model.forward).parameters:
            self.kwargs["cache_position"] = self.pos  # transformers < 5.24
        self.reset()

    def reset(self) -> None:
        """Back to ``ctx`` valid tokens (what later steps wrote is masked out again)."""
        self.pos.fill_(self.ctx)
        self.mask.fill_(False)
        self.mask[..., :self.ctx] = True
        for layer in self.cache.layers:
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, Tensor):  # transformers >= 5.24 writes at this position
                length.fill_(self.ctx)

    forward: Any = None  # what runs the model (a compiled model with --compile)

    def step(self) -> Tensor:
        """One decode step of the whole model; returns the logits."""
        self.mask.index_fill_(3, self.pos, True)
        positions = self.pos.view(1, 1).expand(self.batch, 1)
        forward = self.model if self.forward is None else self.forward
        out = forward(input_ids=self.ids, attention_mask=self.mask, position_ids=positions,
                      use_cache=True, logits_to_keep=1, **self.kwargs)
        self.pos.add_(1)
        return out.logits

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers
                   for t in (layer.keys, layer.values))


def _no_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, mask: Any,
                  **kwargs: Any) -> tuple[Tensor, None]:
    """Attention replaced by zeros (``[B, q_len, Hq, d]``): the rest of the step alone."""
    return torch.zeros_like(query).transpose(1, 2), None


def compile_rest(model: Any) -> None:
    """``torch.compile`` the RMSNorms, the rotary embedding and the MLP (for every row
    alike): the elementwise chains around the matmuls become a few fused kernels."""
    import torch._dynamo
    from transformers.models.llama import modeling_llama

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if not getattr(modeling_llama.apply_rotary_pos_emb, "_nucleus_compiled", False):
        rotary = torch.compile(modeling_llama.apply_rotary_pos_emb, dynamic=False)
        rotary._nucleus_compiled = True
        modeling_llama.apply_rotary_pos_emb = rotary
    for module in model.modules():
        if type(module).__name__ in ("LlamaRMSNorm", "LlamaMLP"):
            module.forward = torch.compile(module.forward, dynamic=False)


def compile_model(model: Any) -> Any:
    """The whole forward under ``torch.compile(fullgraph=True, dynamic=False)`` (inductor on a
    GPU, ``aot_eager`` on CPU); CUDA graphs are captured around it by :func:`time_row`.
    One graph per attention implementation (stock SDPA, ours, none): every method shares
    ours, whose attention is one opaque op per layer."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    backend = "inductor" if model.device.type == "cuda" else "aot_eager"
    return torch.compile(model, fullgraph=True, dynamic=False, backend=backend)


@dataclass
class MatmulLoop:
    """Every weight matrix of the model applied once to a ``[B, in]`` activation with plain
    ``F.linear`` (what the weights alone cost: the matmul part of a step)."""

    model: Any
    batch: int

    def __post_init__(self) -> None:
        dev, dtype = self.model.device, self.model.dtype
        self.weights = [m.weight for m in self.model.modules()
                        if isinstance(m, torch.nn.Linear)]
        self.inputs = {w.shape[1]: torch.randn(self.batch, w.shape[1], device=dev, dtype=dtype)
                       for w in self.weights}

    def reset(self) -> None:
        pass

    def step(self) -> Tensor:
        out = None
        for w in self.weights:
            out = torch.nn.functional.linear(self.inputs[w.shape[1]], w)
        return out


# --- timing one row ---------------------------------------------------------------------------

def time_row(loop: DecodeLoop, steps: int, graphs: bool) -> float:
    """Median seconds of one decode step: CUDA-graph replays timed with events on a GPU."""
    if not graphs:
        loop.step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            loop.step()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]
    graph, _ = capture_graph(loop.step)  # the captured step is not the first of its shape
    for _ in range(3):
        graph.replay()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        graph.replay()
        events[i + 1].record()
    torch.cuda.synchronize()
    times = sorted(events[i].elapsed_time(events[i + 1]) * 1e-3 for i in range(steps))
    del graph
    return times[len(times) // 2]


def run_row(model: Any, loop: DecodeLoop, row: Row, steps: int, graphs: bool) -> dict:
    """Time one row; for a method, also measure what it kept on an eager step."""
    import nucleus_attn as na

    loop.reset()
    handle = None
    kept = kept_all = 1.0
    state_bytes = 0
    if row.kind == "matmuls":
        matmuls = MatmulLoop(model, loop.batch)
        seconds = time_row(matmuls, steps, graphs)  # type: ignore[arg-type]
        return {"label": row.label, "kind": row.kind, "spec": row.spec, "target": row.target,
                "kept_fraction": 1.0, "kept_fraction_all_layers": 1.0, "seconds": seconds,
                "state_bytes": 0, "peak_bytes": 0}
    if row.kind == "stock":
        model.set_attn_implementation("sdpa")
    elif row.kind == "no-attn":
        model.set_attn_implementation(NONE_ATTN)
    else:
        handle = na.enable(model, row.config, dense_layers=DENSE_LAYERS, stats=True)
    if graphs:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        if handle is not None:
            loop.step()  # builds the method's metadata from the whole cache
            summary = handle.summary()
            kept = summary["sparse_kept_fraction"] or 1.0
            kept_all = summary["mean_kept_fraction"] or 1.0
            handle.stats = False
            from ..memory import handle_state_bytes

            state_bytes = handle_state_bytes(handle)
        seconds = time_row(loop, steps, graphs)
        peak = torch.cuda.max_memory_allocated() if graphs else 0
    finally:
        if handle is not None:
            handle.disable()
        model.set_attn_implementation("sdpa")
    return {"label": row.label, "kind": row.kind, "spec": row.spec, "target": row.target,
            "kept_fraction": kept, "kept_fraction_all_layers": kept_all,
            "seconds": seconds, "state_bytes": state_bytes, "peak_bytes": peak}


def profile_rows(model: Any, n: int, b: int, rows: list[Row], top: int = 12,
                 forward: Any = None) -> list[dict]:
    """GPU kernel time of one decode step per row (torch profiler, not in a graph), grouped
    by kernel name: where the time of a step goes."""
    import nucleus_attn as na

    loop = DecodeLoop(model, b, n, 8, 0)
    loop.forward = forward
    out = []
    for row in rows:
        loop.reset()
        handle = None
        if row.kind == "no-attn":
            model.set_attn_implementation(NONE_ATTN)
        elif row.kind != "stock":
            handle = na.enable(model, row.config, dense_layers=DENSE_LAYERS, stats=False)
        try:
            loop.step()  # builds the method's metadata; kernel_times warms up once more
            total, kernels, _ = kernel_times(loop.step, top)
        finally:
            if handle is not None:
                handle.disable()
            model.set_attn_implementation("sdpa")
        out.append({"n": n, "batch": b, "label": row.label, "total_us": total,
                    "kernels": kernels})
        print(f"kernels of one eager step, N={n} B={b}, {row.label}: {total / 1e3:.2f} ms GPU")
        for k in kernels:
            print(f"  {k['us']:10.1f} us  x{k['calls']:<4d} {k['kernel'][:100]}")
    del loop
    return out


# --- byte floors ----------------------------------------------------------------------------

def weight_bytes(model: Any) -> int:
    """Bytes a decode step reads of the weights (the embedding reads one row per token)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


def step_floor_bytes(row: dict, model: Any, b: int, n: int) -> float:
    """Bytes one step must move: weights, dense layers' KV, the sparse layers' method reads."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    shape = Shape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, model.dtype)
    dense_kv = floor_bytes("dense", b, n, shape, 0.0)
    base = weight_bytes(model)
    if row["kind"] in ("no-attn", "matmuls"):
        return base
    if row["kind"] in ("stock", "dense"):
        return base + layers * dense_kv
    spec = parse_method(row["spec"])
    kept = row["kept_fraction"] * b * shape.hkv * n
    name = spec.name
    if name == "streaming":
        per_layer = kept * 2 * shape.d * shape.es
    elif name == "twilight":  # candidates: every key (dense base) or the base's budget
        per_row = n if spec.base == "dense" else min(n, resolve_budget(spec.base_budget, n))
        per_layer = floor_bytes("twilight", b, n, shape, kept, spec, per_row * b * shape.hkv)
    else:
        per_layer = floor_bytes(name, b, n, shape, kept, spec)
    sparse = layers - DENSE_LAYERS
    return base + DENSE_LAYERS * dense_kv + sparse * per_layer


# --- one point, the report --------------------------------------------------------------------

def fits(model: Any, b: int, n: int, headroom: int, device: torch.device) -> bool:
    """Whether the cache plus the largest method state (~20% of the KV) fits."""
    if device.type != "cuda":
        return True
    cfg = model.config
    kv = 2 * b * cfg.num_key_value_heads * (n + headroom) * cfg.head_dim * \
        cfg.num_hidden_layers * model.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    return 1.2 * kv + (4 << 30) < free


def bench_point(model: Any, n: int, b: int, fractions: list[float], methods: list[str],
                steps: int, bw: float, graphs: bool, seed: int,
                progress: Callable[[str], None], forward: Any = None) -> list[dict]:
    headroom = steps + 16
    loop = DecodeLoop(model, b, n, headroom, seed)
    loop.forward = forward
    rows = [Row("stock sdpa", "stock"), Row("dense", "dense"), Row("no-attn", "no-attn"),
            Row("matmuls", "matmuls")]
    rows += method_rows(n, fractions, methods)
    out = []
    for row in rows:
        progress(f"N={n} B={b} {row.label}")
        r = run_row(model, loop, row, steps, graphs)
        r.update(n=n, batch=b, kv_cache_bytes=loop.kv_bytes())
        r["floor_seconds"] = step_floor_bytes(r, model, b, n) / bw
        out.append(r)
    cfg = model.config
    for r in out:  # the code's own account of the metadata, over the allocated positions
        r["state_accounted_bytes"] = 0.0
        r["state_bytes_per_token_layer"] = 0.0
        if r["kind"] == "method":
            acct = memory_table([parse_method(r["spec"])], head_dim=cfg.head_dim,
                                dtype=model.dtype, kv_heads=cfg.num_key_value_heads,
                                layers=cfg.num_hidden_layers - DENSE_LAYERS,
                                tokens=b * (n + headroom))[0]
            r["state_accounted_bytes"] = acct["metadata_bytes"]
            r["state_bytes_per_token_layer"] = acct["bytes_per_token_layer"]
    del loop
    dense_peak = next(r for r in out if r["kind"] == "dense")["peak_bytes"]
    for r in out:
        r["peak_over_dense_bytes"] = r["peak_bytes"] - dense_peak
    dense = next(r for r in out if r["kind"] == "dense")["seconds"]
    rest = next(r for r in out if r["kind"] == "no-attn")["seconds"]
    for r in out:
        r["speedup"] = dense / r["seconds"]
        r["amdahl_bound"] = dense / rest
        r["bound_fraction"] = (r["speedup"] - 1) / (r["amdahl_bound"] - 1) \
            if r["amdahl_bound"] >= MIN_BOUND else float("nan")
        r["floor_fraction"] = r["floor_seconds"] / r["seconds"]
    return out


def bound_cell(r: dict) -> str:
    """The "% of bound" cell: the share of the Amdahl bound's gain a method row reached;
    "slower" when it lost to dense (the share is negative), "-" when the bound is under
    :data:`MIN_BOUND` (nothing to gain: the share would divide by almost zero)."""
    if r["kind"] != "method":
        return ""
    if not r["amdahl_bound"] >= MIN_BOUND:
        return "-"
    if r["speedup"] < 1:
        return "slower"
    return f"{r['bound_fraction'] * 100:.0f}"


def off_target(r: dict) -> bool:
    """Whether a method row kept far more or far less than its target fraction."""
    return r["kind"] == "method" and not (
        r["target"] / OFF_TARGET <= r["kept_fraction"] <= r["target"] * OFF_TARGET)


def print_table(rows: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"whole-model decode step, {meta['gpu']}, Llama-3-8B shape (random weights), "
             f"bf16, CUDA graphs{', compiled: ' + meta['compiled'] if meta['compiled'] else ''}"
             "; speed-up vs our "
             f"dense (same hook and cache); floor at {meta['floor_bandwidth'] / 1e12:.2f} TB/s"
             if meta["device"] == "cuda" else "whole-model decode step (CPU smoke, eager)")
    table = Table(title=title)
    for col in ("N", "B", "row", "kept %", "ms", "x dense", "bound", "% of bound",
                "floor ms", "% floor", "state MB", "acct MB", "peak GB", "+peak MB"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        table.add_row(
            str(r["n"]), str(r["batch"]), r["label"],
            f"{r['kept_fraction'] * 100:.2f}{'*' if off_target(r) else ''}",
            f"{r['seconds'] * 1e3:.2f}", f"{r['speedup']:.2f}", f"{r['amdahl_bound']:.2f}",
            bound_cell(r),
            f"{r['floor_seconds'] * 1e3:.2f}", f"{r['floor_fraction'] * 100:.0f}",
            f"{r['state_bytes'] / 2**20:.0f}", f"{r['state_accounted_bytes'] / 2**20:.0f}",
            f"{r['peak_bytes'] / 2**30:.1f}", f"{r['peak_over_dense_bytes'] / 2**20:.0f}")
    Console(width=180).print(table)
    print("state MB: the method's metadata measured on its tensors; acct MB: the code's own "
          "account (nucleus_attn.memory) for the allocated positions; +peak MB: peak "
          "allocation over the dense row's; % of bound: (x dense - 1) / (bound - 1), "
          f"'slower' below dense, '-' where the bound is under {MIN_BOUND}")
    if any(off_target(r) for r in rows):
        print(f"kept % with *: more than {OFF_TARGET}x off the row's target (its label): a "
              "fixed budget cannot go below the sink and window (68 tokens); a top-p row "
              "keeps what p buys on these random weights (the union over a GQA group's "
              "query heads)")
    for s in meta["skipped"]:
        print(f"skipped: {s}")
    for line in target_lines(rows):
        print(line)


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets for the lean step, each next to what was measured."""
    out = []

    def pick(n: int, b: int, pred: Callable[[dict], bool]) -> list[dict]:
        return [r for r in rows if r["n"] == n and r["batch"] == b and pred(r)]

    def name(r: dict) -> str:
        return r["spec"].split(":")[0]

    for b in (1, 4):
        for n in sorted({r["n"] for r in rows}):
            rest = pick(n, b, lambda r: r["kind"] == "no-attn")
            if rest:
                r = rest[0]
                ratio = r["seconds"] / r["floor_seconds"]
                out.append(f"target no-attn <= 1.2x its byte floor (N={n} B={b}): "
                           f"{r['seconds'] * 1e3:.2f} ms / {r['floor_seconds'] * 1e3:.2f} ms "
                           f"= {ratio:.2f}x {'MET' if ratio <= 1.2 else 'missed'}")
    for b, need in ((1, 1.5), (4, 2.6)):
        adaptive = pick(131072, b, lambda r: r["kind"] == "method"
                        and name(r) in ("twilight", "tactic"))
        if adaptive:
            best = max(adaptive, key=lambda r: r["speedup"])
            share = bound_cell(best)
            share = share + "%" if share not in ("-", "slower") else share
            out.append(f"target best adaptive >= {need}x at 128k x {b}: {best['label']} "
                       f"{best['speedup']:.2f}x ({share} of the "
                       f"Amdahl bound {best['amdahl_bound']:.2f}) "
                       f"{'MET' if best['speedup'] >= need else 'missed'}")
    quest = pick(131072, 4, lambda r: r["kind"] == "method" and name(r) == "quest")
    if quest:
        best = max(quest, key=lambda r: r["speedup"])
        out.append(f"target Quest >= 2.8x at 128k x 4: {best['label']} {best['speedup']:.2f}x "
                   f"{'MET' if best['speedup'] >= 2.8 else 'missed'}")
    short = [r for r in rows if r["n"] == 4096 and r["kind"] == "method"]
    if short:
        worst = min(short, key=lambda r: r["speedup"])
        out.append(f"target no method slower than dense by > 3% at 4k: worst {worst['label']} "
                   f"(B={worst['batch']}) {worst['speedup']:.2f}x "
                   f"{'MET' if worst['speedup'] >= 0.97 else 'missed'}")
    return out


#: Colours of the rows' variants (a method, with its base for Twilight); others get the
#: next free colour of matplotlib's cycle.
COLOURS = {"stock sdpa": "tab:grey", "quest": "tab:blue", "twilight": "tab:green",
           "twilight base=quest": "tab:olive", "twilight base=cluster": "tab:cyan",
           "tactic": "tab:red", "streaming": "tab:purple"}


def variant(r: dict) -> str:
    """The row's method variant: its label without the kept fraction (and any note)."""
    return re.sub(r"\s*\d+(\.\d+)?%.*$", "", r["label"])


def variant_colours(rows: list[dict]) -> dict[str, str]:
    """A distinct colour per variant of the plotted rows."""
    spare = ["tab:orange", "tab:brown", "tab:pink", "gold", "navy", "teal", "lime"]
    out: dict[str, str] = {}
    for v in dict.fromkeys(variant(r) for r in rows if r["kind"] in ("method", "stock")):
        out[v] = COLOURS.get(v) or next((c for c in spare if c not in out.values()), "k")
    return out


def plot(rows: list[dict], path: str, meta: dict) -> None:
    """Speed-up against our dense step vs context length, one panel per batch: a colour
    per method variant (Twilight's bases apart), a line style per kept fraction, the
    Amdahl bound dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows if r["kind"] == "method"})
    colour = variant_colours(rows)
    styles = dict(zip(targets, ["o-", "s--", "^:", "d-."], strict=False))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches) + 2.2, 3.8),
                             squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        sub = [r for r in rows if r["batch"] == b]
        for label in dict.fromkeys(r["label"] for r in sub if r["kind"] in ("method", "stock")):
            first = next(r for r in sub if r["label"] == label)
            style = "x-" if first["kind"] == "stock" else styles.get(first["target"], "o-")
            pts = sorted((r["n"], r["speedup"]) for r in sub if r["label"] == label)
            ax.plot(*zip(*pts, strict=True), style, color=colour[variant(first)],
                    label=label, lw=1.1, ms=4)
        bound = sorted({(r["n"], r["amdahl_bound"]) for r in sub})
        # a marker too: with one context length the dotted line is a single point
        ax.plot(*zip(*bound, strict=True), "k:", marker="_", ms=14, mew=1.5, lw=1.5,
                label="Amdahl bound")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_title(f"batch {b}")
    axes[0][0].set_ylabel("per-token speed-up vs our dense")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(f"end-to-end decode, {meta['gpu']}, Llama-3-8B shape (random weights)"
                 if meta["device"] == "cuda" else "end-to-end decode (CPU smoke)")
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (4.6 * len(batches) + 2.2), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str = "results", quick: bool = False, ns: list[int] | None = None,
         batches: list[int] | None = None, fractions: list[float] | None = None,
         methods: list[str] | None = None, steps: int = 20, compile: str | bool = False,
         seed: int = 0, profile: tuple[int, int] | None = None) -> int:
    """Run the benchmark, print the table, write ``bench_e2e_<gpu>.json/.png``.

    ``compile``: False (eager modules), ``"whole"`` (or True: the lean step, the whole
    forward compiled) or ``"parts"`` (only norms, rotary and MLP compiled)."""
    if compile is True:
        compile = "whole"
    if compile not in (False, "whole", "parts"):
        raise ValueError(f"bench e2e: compile={compile!r} must be False, 'whole' or 'parts'")
    return _main(out, quick, ns, batches, fractions, methods, steps, compile, seed, profile)


def _main(out: str, quick: bool, ns: list[int] | None, batches: list[int] | None,
          fractions: list[float] | None, methods: list[str] | None, steps: int,
          compile: str | bool, seed: int, profile: tuple[int, int] | None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type != "cuda" and not quick:
        print("nucleus-attn bench e2e needs a CUDA GPU; use --quick for a CPU smoke test")
        return 2
    arch, dtype = (TINY, torch.float32) if quick else (LLAMA3_8B, torch.bfloat16)
    # quick: long enough that a 10% budget holds the sink and window (68 tokens)
    ns = ns or ([1024] if quick else [4096, 32768, 131072])
    batches = batches or ([2] if quick else [1, 4, 8])
    fractions = fractions or ([0.1] if quick else [0.01, 0.02, 0.05])
    methods = methods or ["quest", "twilight", "tactic", "streaming"]
    steps = 3 if quick else steps
    graphs = device.type == "cuda"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NONE_ATTN, _no_attention)
    AttentionMaskInterface.register(NONE_ATTN, sdpa_mask)
    copy_bw, read_bw = bandwidths(device, quick)
    bw = max(copy_bw, read_bw)
    model = build_model(arch, dtype, device, seed)
    forward = None
    if compile == "parts":
        compile_rest(model)
    elif compile == "whole":
        forward = compile_model(model)
    compiled = compile or ""
    meta: dict[str, Any] = {
        "gpu": gpu_label(device), "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if graphs else platform.processor(),
        "copy_bandwidth": copy_bw, "read_bandwidth": read_bw, "floor_bandwidth": bw,
        "torch": torch.__version__, "arch": arch, "dtype": str(dtype),
        "dense_layers": DENSE_LAYERS, "steps": steps, "compiled": compiled,
        "weight_bytes": weight_bytes(model), "skipped": [],
        "note": "random weights: sparse methods run at fixed kept fractions (see rows' "
                "target and kept_fraction)",
    }
    import transformers

    meta["transformers"] = transformers.__version__
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"bench_e2e_{meta['gpu']}")
    rows: list[dict] = []
    points = [(n, b) for n in sorted(ns, reverse=True) for b in sorted(batches)]
    from tqdm import tqdm

    bar = tqdm(points, desc="bench e2e", disable=quick)
    for n, b in bar:
        if not fits(model, b, n, steps + 16, device):
            meta["skipped"].append(f"N={n} B={b}: the cache does not fit in GPU memory")
            continue
        rows += bench_point(model, n, b, fractions, methods, steps, bw, graphs, seed,
                            lambda s: bar.set_postfix_str(s), forward)
        write_results(stem, meta, rows)  # after every point: partial runs count
        if graphs:
            torch.cuda.empty_cache()
    rows.sort(key=lambda r: (r["n"], r["batch"]))
    print_table(rows, meta)
    if profile is not None and graphs:  # last: a failure here cannot cost the rows above
        n, b = profile
        prof_rows = [Row("dense", "dense"), Row("no-attn", "no-attn")]
        prof_rows += [r for r in method_rows(n, fractions[:1], methods)]
        meta["profile"] = profile_rows(model, n, b, prof_rows, forward=forward)
    write_results(stem, meta, rows, plot)
    return 0

