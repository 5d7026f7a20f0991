"""``nucleus-attn bench generate``: what users run, ``model.generate()``, eager and compiled.

For each prompt length, on one random-weight Llama (Llama-3-8B's config in bf16 on a GPU;
a tiny one with ``--quick``), every row generates ``new_tokens`` tokens greedily through
``model.generate`` from the same prompt:

- ``stock sdpa``: transformers' own attention, no nucleus-attn;
- ``dense``: our ``dense`` method through the same hook as the sparse methods;
- each sparse method (random weights give near-uniform attention, so the adaptive methods
  run at settings that keep a few percent: see :data:`DEFAULT_METHODS`).

``eager`` rows use the model's dynamic cache (the README's path); ``compiled`` rows use
``enable(..., compile=True)`` (a static cache and decode steps compiled with
``torch.compile(mode="reduce-overhead")``: one CUDA graph per step), and the stock row the
same transformers options. Rows run interleaved, ``repeats`` times each, after one
discarded warm-up generation per row and mode (which also gives the kept fraction: timed
runs record no statistics).

The prompt is prefilled once per length (stock SDPA, timed: ``prefill`` in the table) and
every generation continues from a copy of that cache (cropped back after each run): each
run's own prefill is the prompt's last :data:`TAIL` tokens, which is where the method's
metadata is built in compiled mode. Per run, from CUDA events recorded by a logits
processor at every new token (host clock on CPU): ``first`` (the first decode step:
metadata build plus any kernel compilation left), ``steady`` (mean of the last
``steady_steps`` steps) and tokens/s.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..methods import parse_method
from .e2e import LLAMA3_8B, TINY, build_model
from .kernels import gpu_label, write_results

#: Prompt tokens each generation prefills itself (the rest comes from the shared cache).
TAIL = 2
#: The sparse rows by default (settings that keep a few percent on random weights, whose
#: attention is nearly uniform: top-p over every key, as Twilight's default base and Tactic
#: do, keeps about p of the tokens; over the Quest base's N/4 candidates, about p / 4).
DEFAULT_METHODS = ["quest:budget=0.02", "twilight:p=0.1", "twilight:p=0.9,base=quest",
                   "tactic:p=0.1", "streaming:sink=4,window=1020"]
QUICK_METHODS = ["quest:budget=32", "twilight:p=0.3", "tactic:p=0.5",
                 "streaming:sink=4,window=28"]
DENSE_LAYERS = 2


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # "stock", "dense" or "method"
    spec: str = "dense"


def rows_for(methods: list[str]) -> list[Row]:
    rows = [Row("stock sdpa", "stock"), Row("dense", "dense")]
    for m in methods:
        parse_method(m)  # fail early on a bad spec
        rows.append(Row(m, "method", m))
    return rows


# --- timing one generation ----------------------------------------------------------------

class _Clock:
    """A logits processor recording when each new token is ready: CUDA events on a GPU
    (no sync), the host clock elsewhere."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events: list[Any] = []
        self.host: list[float] = []

    def mark(self) -> None:
        self.host.append(time.perf_counter())
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.mark()
        return scores

    def times(self) -> list[float]:
        """Seconds from the start mark to each token."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.events[0].elapsed_time(e) * 1e-3 for e in self.events[1:]]
        return [t - self.host[0] for t in self.host[1:]]


def timed_generate(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int,
                   steady_steps: int, **kwargs: Any) -> dict[str, Any]:
    """One ``model.generate`` continuing from ``cache``; its per-token times."""
    from transformers import LogitsProcessorList

    clock = _Clock(ids.is_cuda)
    clock.mark()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                   logits_processor=LogitsProcessorList([clock]),
                   **{_cache_kwargs(model): cache}, **kwargs)
    t = clock.times()
    steps = [b - a for a, b in zip(t, t[1:], strict=False)]
    tail = steps[-steady_steps:]
    steady = sum(tail) / max(len(tail), 1)
    return {"tail_prefill_s": t[0], "first_step_s": steps[0] if steps else None,
            "steady_s": steady, "tokens_per_s": 1.0 / steady if steady else None,
            "steps_s": steps}


def _cache_kwargs(model: Any) -> str:
    from ..eval.runner import cache_kwarg

    return cache_kwarg(model)


def prefill_cache(model: Any, ids: torch.Tensor, static_len: int | None) -> tuple[Any, float]:
    """The KV cache of ``ids`` (a dynamic cache, or a static one of ``static_len``
    positions) and the seconds the prefill took (stock SDPA)."""
    from transformers import DynamicCache, StaticCache

    cache = (DynamicCache(config=model.config) if static_len is None
             else StaticCache(config=model.config, max_cache_len=static_len))
    model.set_attn_implementation("sdpa")
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
              logits_to_keep=1, **{_cache_kwargs(model): cache})
    sync()
    return cache, time.perf_counter() - start


def crop(cache: Any, length: int) -> None:
    """Back to the first ``length`` tokens (what the previous run appended is dropped)."""
    excess = int(cache.get_seq_length()) - length
    if excess <= 0:
        return
    try:
        cache.crop(-excess)  # transformers >= 5.24: the number of tokens to remove
    except (ValueError, RuntimeError):
        cache.crop(length)  # older: the length to keep
    except AttributeError:  # older static layers (5.17) cannot crop: do what crop does
        for layer in cache.layers:
            layer.keys[:, :, length:].zero_()
            layer.values[:, :, length:].zero_()
            written = getattr(layer, "cumulative_length", None)  # the layer's length
            if isinstance(written, torch.Tensor):
                written.fill_(length)  # in place: its address is marked static
            elif written is not None:
                layer.cumulative_length = length


# --- one row ------------------------------------------------------------------------------

def compile_config(device: torch.device) -> Any:
    from transformers import CompileConfig

    if device.type == "cuda":
        return CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    # CPU (the smoke test): no CUDA graphs, no inductor; transformers compiles generate's
    # decode step on CPU only when asked to explicitly
    cfg = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager", mode=None)
    cfg._compile_all_devices = True
    return cfg


def run_row(model: Any, row: Row, mode: str, ids: torch.Tensor, cache: Any, base: int,
            new_tokens: int, steady_steps: int, warmup: bool) -> dict[str, Any]:
    """Switch the row on, optionally run the discarded warm-up generation (which measures
    the kept fraction), then one timed generation without statistics."""
    import nucleus_attn as na

    device = ids.device
    compiled = mode == "compiled"
    kwargs: dict[str, Any] = {}
    handle = None
    if row.kind == "stock":
        model.set_attn_implementation("sdpa")
        if compiled:
            kwargs["compile_config"] = compile_config(device)
    else:
        cfg = parse_method(row.spec)  # the method itself, not the crossover rule:
        cfg = cfg.replace(dense_below=0) if cfg.dense_below is None else cfg
        handle = na.enable(model, cfg, dense_layers=DENSE_LAYERS,
                           stats=warmup, compile=compile_config(device) if compiled else False)
        if compiled:  # our own (pre-filled) static cache instead of the one compile= asks
            kwargs["cache_implementation"] = None
    extra: dict[str, Any] = {}
    try:
        if warmup:
            crop(cache, base)
            warm = timed_generate(model, ids, cache, new_tokens, steady_steps, **kwargs)
            extra = {"warmup_first_step_s": warm["first_step_s"],
                     "warmup_steady_s": warm["steady_s"],
                     "kept_fraction": 1.0, "kept_fraction_all_layers": 1.0}
            if handle is not None:
                s = handle.summary()
                if s["sparse_kept_fraction"] is not None:
                    extra["kept_fraction"] = s["sparse_kept_fraction"]
                extra["kept_fraction_all_layers"] = s["mean_kept_fraction"] or 1.0
                handle.stats = False  # timed runs record nothing (graphs recorded again)
        crop(cache, base)
        t = timed_generate(model, ids, cache, new_tokens, steady_steps, **kwargs)
    finally:
        if handle is not None:
            handle.disable()
        model.set_attn_implementation("sdpa")
    t.update(extra)
    return t


# --- the benchmark ------------------------------------------------------------------------

def bench_length(model: Any, n: int, rows: list[Row], modes: list[str], new_tokens: int,
                 steady_steps: int, repeats: int, seed: int, progress: Any) -> list[dict]:
    """Every row and mode at one prompt length, interleaved: repeats are the outer loop."""
    device = model.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).to(device)
    base = n - TAIL
    caches, prefill = {}, {}
    for mode in modes:
        static = n + new_tokens + 8 if mode == "compiled" else None
        caches[mode], prefill[mode] = prefill_cache(model, ids[:, :base], static)
    results: dict[tuple[str, str], list[dict]] = {}
    # repeats outermost, rows interleaved within each; each row's first run warms it up
    for rep in range(repeats):
        for mode in modes:
            for row in rows:
                progress(f"N={n} {mode} {row.label} ({rep + 1}/{repeats})")
                key = (mode, row.label)
                r = run_row(model, row, mode, ids, caches[mode], base, new_tokens,
                            steady_steps, warmup=rep == 0)
                r["repeat"] = rep
                results.setdefault(key, []).append(r)
    del caches
    out = []
    for (mode, label), runs in results.items():
        row = next(r for r in rows if r.label == label)
        steady = sorted(r["steady_s"] for r in runs)
        first = sorted(r["first_step_s"] for r in runs)
        out.append({
            "n": n, "mode": mode, "label": label, "kind": row.kind, "spec": row.spec,
            "prefill_s": prefill[mode], "new_tokens": new_tokens,
            "steady_steps": steady_steps, "repeats": len(runs),
            "steady_s": steady[len(steady) // 2], "steady_min_s": steady[0],
            "steady_max_s": steady[-1], "first_step_s": first[len(first) // 2],
            "warmup_first_step_s": runs[0]["warmup_first_step_s"],
            "warmup_steady_s": runs[0]["warmup_steady_s"],
            "tokens_per_s": 1.0 / steady[len(steady) // 2],
            "kept_fraction": runs[0]["kept_fraction"],
            "kept_fraction_all_layers": runs[0]["kept_fraction_all_layers"],
            "runs": runs,
        })
    for r in out:
        dense = next(x for x in out if x["mode"] == r["mode"] and x["kind"] == "dense")
        r["speedup_vs_dense"] = dense["steady_s"] / r["steady_s"]
        r["first_step_over_prefill"] = r["first_step_s"] / r["prefill_s"]
    return out


def print_table(rows: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model.generate(), {meta['gpu']}, {meta['model']}, greedy, batch 1, "
                        f"{meta['new_tokens']} new tokens (steady: mean of the last "
                        f"{meta['steady_steps']}); median of {meta['repeats']} interleaved "
                        "runs; prefill apart (shared, stock SDPA)")
    for col in ("N", "mode", "row", "prefill s", "1st step ms", "1st/prefill", "steady ms",
                "min-max ms", "tok/s", "x dense", "kept (all)", "kept (sparse)"):
        table.add_column(col, justify="left" if col in ("mode", "row") else "right")
    for r in sorted(rows, key=lambda r: (r["n"], r["mode"])):
        table.add_row(
            str(r["n"]), r["mode"], r["label"], f"{r['prefill_s']:.2f}",
            f"{r['first_step_s'] * 1e3:.1f}", f"{r['first_step_over_prefill'] * 100:.1f}%",
            f"{r['steady_s'] * 1e3:.2f}",
            f"{r['steady_min_s'] * 1e3:.1f}-{r['steady_max_s'] * 1e3:.1f}",
            f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_dense']:.2f}",
            f"{r['kept_fraction_all_layers']:.3f}", f"{r['kept_fraction']:.3f}")
    Console(width=170).print(table)


def plot(rows: list[dict], path: str, meta: dict) -> None:
    """Steady ms/token and first-step ms per row, a bar per (prompt length, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    groups = sorted({(r["n"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(len(groups), 1)
    for j, (n, mode) in enumerate(groups):
        sub = {r["label"]: r for r in rows if (r["n"], r["mode"]) == (n, mode)}
        xs = [i + j * width for i in range(len(labels))]
        for ax, keyname, scale in ((axes[0], "steady_s", 1e3), (axes[1], "first_step_s", 1e3)):
            ys = [sub[lab][keyname] * scale if lab in sub else 0 for lab in labels]
            ax.bar(xs, ys, width, label=f"N={n} {mode}")
    for ax, title in ((axes[0], "steady ms / token"), (axes[1], "first decode step, ms")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"model.generate(), {meta['gpu']}, {meta['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str = "results", quick: bool = False, ns: list[int] | None = None,
         methods: list[str] | None = None, modes: list[str] | None = None,
         new_tokens: int | None = None, repeats: int | None = None, seed: int = 0) -> int:
    """Run the benchmark, print the table, write ``bench_generate_<gpu>.json/.png``."""
    cuda = torch.cuda.is_available() and not quick
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not quick:
        print("nucleus-attn bench generate needs a CUDA GPU; use --quick for a CPU smoke test")
        return 2
    ns = ns or ([96] if quick else [32768, 131072])
    methods = methods or (QUICK_METHODS if quick else DEFAULT_METHODS)
    modes = modes or (["eager"] if quick else ["eager", "compiled"])
    bad = sorted(set(modes) - {"eager", "compiled"})
    if bad:
        raise ValueError(f"bench generate: modes {bad} are not eager or compiled")
    new_tokens = new_tokens or (12 if quick else 48)
    steady_steps = min(32, max(1, new_tokens - 8))
    repeats = repeats or (1 if quick else 2)
    arch, dtype = (TINY, torch.float32) if quick else (LLAMA3_8B, torch.bfloat16)
    arch = dict(arch, max_position_embeddings=max(max(ns) + new_tokens + 16,
                                                  arch["max_position_embeddings"]))
    if quick:
        torch.set_num_threads(1)
    model = build_model(arch, dtype, device, seed)
    import transformers

    meta: dict[str, Any] = {
        "gpu": gpu_label(device), "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor(),
        "model": "random-weight Llama-3-8B config, bf16" if not quick else "tiny Llama, fp32",
        "arch": arch, "torch": torch.__version__, "transformers": transformers.__version__,
        "new_tokens": new_tokens, "steady_steps": steady_steps, "repeats": repeats,
        "dense_layers": DENSE_LAYERS, "tail_prefill_tokens": TAIL,
        "command": "nucleus-attn bench generate" + (" --quick" if quick else ""),
    }
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"bench_generate_{meta['gpu']}")
    rows = rows_for(methods)
    results: list[dict] = []
    for n in sorted(ns):
        results += bench_length(model, n, rows, modes, new_tokens, steady_steps, repeats, seed,
                                lambda s: print(s, flush=True) if not quick else None)
        write_results(stem, meta, results)  # after every length: partial runs count
        if cuda:
            torch.cuda.empty_cache()
    print_table(results, meta)
    write_results(stem, meta, results, plot)
    return 0
