"""Memory of a long generation under a method: the device's allocations as decode goes on,
next to the KV cache, the method's metadata and their analytic account.

The point is to see that memory grows only with the cache: the metadata should stay
within its account (:mod:`nucleus_attn.memory`, at most twice it while buffers grow by
doubling) and nothing else should grow per step; and that the time per token stays flat
apart from the cache's growth (no recompilation, re-allocation or leak slowing later steps).
Allocations and the time of every token are sampled from inside ``generate`` by a logits
processor (called once per new token: CUDA events on a GPU, no sync), which also ticks the
progress bar. The per-token times are summarised per window of steps and fitted with a line
against the cached tokens: ``growth`` is its slope (ms per 1k cached tokens, what the cache
costs), ``flatness`` the largest window mean over the fitted line (1.0: flat).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..memory import KV_CACHE, bytes_per_token, handle_state_bytes, memory_table, tensor_bytes
from ..methods import MethodConfig, describe, make_config


class _Sampler:
    """A logits processor that counts steps, samples allocated memory and ticks a bar."""

    def __init__(self, device: torch.device, every: int, advance: Any) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.every = every
        self.advance = advance
        self.step = 0
        self.samples: list[tuple[int, int]] = []
        self.events: list[Any] = []  # one per token (CUDA)
        self.host: list[float] = []  # one per token (host clock)

    def sample(self) -> None:
        if self.cuda:
            self.samples.append((self.step, torch.cuda.memory_allocated(self.device)))

    def mark(self) -> None:
        self.host.append(time.perf_counter())
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.mark()
        self.step += 1
        if self.step % self.every == 0:
            self.sample()
        self.advance()
        return scores

    def step_seconds(self) -> list[float]:
        """Seconds of each decode step (token i-1 to token i; the first token follows the
        prefill and is left out)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            ev = self.events
            return [a.elapsed_time(b) * 1e-3 for a, b in zip(ev, ev[1:], strict=False)]
        return [b - a for a, b in zip(self.host, self.host[1:], strict=False)]


def time_profile(steps: list[float], prompt_tokens: int, windows: int = 20) -> dict[str, Any]:
    """Per-token times summarised: means per window, a least-squares line against the cached
    tokens, and how far the windows stray above it.

    Returns ``window_ms`` (``[first step, mean ms]`` per window), ``growth_ms_per_1k``
    (slope), ``intercept_ms``, ``flatness`` (max over windows, the first excluded, of the
    window mean / the line at its middle: 1.0 is flat), ``first_window_ms`` and
    ``last_window_ms``.
    """
    if not steps:
        return {"window_ms": [], "growth_ms_per_1k": None, "intercept_ms": None,
                "flatness": None, "first_window_ms": None, "last_window_ms": None}
    size = max(1, len(steps) // windows)
    win = []
    for i in range(0, len(steps) - size + 1, size):
        chunk = steps[i:i + size]
        win.append((i, 1e3 * sum(chunk) / len(chunk)))
    # fit on the steps after the first window (the first steps compile and warm up)
    xs = [prompt_tokens + 1 + i for i in range(size if len(win) > 1 else 0, len(steps))]
    ys = [1e3 * steps[x - prompt_tokens - 1] for x in xs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    icept = my - slope * mx
    ratios = [ms / max(icept + slope * (prompt_tokens + 1 + i + size / 2), 1e-9)
              for i, ms in win[1:]] or [1.0]
    return {"window_ms": win, "growth_ms_per_1k": 1e3 * slope, "intercept_ms": icept,
            "flatness": max(ratios), "first_window_ms": win[0][1], "last_window_ms": win[-1][1]}


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def measure_growth(
    model: Any,
    method: str | MethodConfig,
    *,
    prompt_tokens: int,
    new_tokens: int,
    device: str | torch.device,
    batch: int = 1,
    dense_layers: int = 2,
    sample_every: int = 100,
    seed: int = 0,
    progress: bool = True,
    compile: Any = False,
    **params: Any,
) -> dict[str, Any]:
    """Generate ``new_tokens`` after a random prompt under ``method`` and account memory.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A supported causal LM, already on ``device``.
    method : str or MethodConfig
        The method (``**params`` are its parameters, as for :func:`nucleus_attn.enable`).
    prompt_tokens, new_tokens : int
        Prompt length and tokens generated (``min_new_tokens = max_new_tokens``, so the
        run never stops early).
    device : str or torch.device
        Where the model runs. On CUDA, ``memory_allocated`` is sampled every
        ``sample_every`` steps and the peak is read; elsewhere only the byte counts of the
        cache, the states and the account are returned.
    batch : int
        Rows generated together (same length, no padding).
    dense_layers : int
        As for :func:`nucleus_attn.enable`.
    sample_every : int
        Decode steps between two samples.
    seed : int
        Seed of the random prompt.
    progress : bool
        Show a progress bar over the new tokens (transient).
    compile : bool or transformers.CompileConfig
        As for :func:`nucleus_attn.enable` (a static cache of ``prompt + new_tokens``
        positions and compiled decode steps).

    Returns
    -------
    dict
        ``method``, ``device``, ``batch``, ``prompt_tokens``, ``new_tokens``,
        ``cached_tokens`` (per row at the end: the last token is never written to the
        cache), ``layers``, ``sparse_layers``, ``elapsed_s``; ``kv_cache_bytes`` (measured
        on the returned cache's tensors) and ``kv_cache_accounted`` (2 d itemsize per token,
        head and layer); ``state_bytes`` (the handle's method states right after
        generation) and ``accounting`` (the :func:`~nucleus_attn.memory.memory_table` row
        for the sparse layers and the cached tokens); on CUDA ``baseline_allocated``
        (before generating), ``samples`` (``(step, memory_allocated)`` pairs, the last one
        after generation) and ``max_memory_allocated``, None elsewhere; ``step_seconds``
        (every decode step: CUDA events on a GPU, the host clock elsewhere) and ``time``
        (:func:`time_profile` of them).
    """
    from rich.progress import Progress
    from transformers import LogitsProcessorList

    from ..integrations.hf import enable

    device = torch.device(device)
    cuda = device.type == "cuda"
    cfg = make_config(method, **params)
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, prompt_tokens), generator=gen).to(device)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    baseline = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)

    start = time.perf_counter()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"{cfg.name}: {new_tokens} tokens", total=new_tokens)
        sampler = _Sampler(device, sample_every, lambda: bar.advance(task))
        handle = enable(model, cfg, dense_layers=dense_layers, stats=False, compile=compile)
        try:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    pad_token_id=0 if pad is None else pad, return_dict_in_generate=True,
                    logits_processor=LogitsProcessorList([sampler]),
                )
            if cuda:
                torch.cuda.synchronize(device)
            sampler.sample()  # at the end, with the states still alive
            states = handle_state_bytes(handle)
            steps = sampler.step_seconds()
            kinds = [layer.stats.kind for layer in handle._layers.values()]
        finally:
            handle.disable()
    elapsed = time.perf_counter() - start

    cache = out.get("cache")
    if cache is None:
        cache = out.get("past_key_values")
    cached = prompt_tokens + new_tokens - 1
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    shape = dict(head_dim=_head_dim(config), dtype=model.dtype, kv_heads=kv_heads)
    sparse = sum(kind == "sparse" for kind in kinds)
    kv_per_token = bytes_per_token("dense", **shape)[KV_CACHE]
    return {
        "method": describe(cfg),
        "device": str(device),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "cached_tokens": cached,
        "layers": len(kinds),
        "sparse_layers": sparse,
        "elapsed_s": elapsed,
        "kv_cache_bytes": tensor_bytes(cache),
        "kv_cache_accounted": kv_per_token * len(kinds) * batch * cached,
        "state_bytes": states,
        "accounting": memory_table([cfg], **shape, layers=sparse, tokens=batch * cached)[0],
        "baseline_allocated": baseline,
        "samples": sampler.samples if cuda else None,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device) if cuda else None,
        "step_seconds": steps,
        "time": time_profile(steps, prompt_tokens),
    }


#: A small random Llama with Llama-3-8B's attention shape (8 KV heads, d=128), so that a
#: 10k-step generation takes about a minute per method on one GPU.
SMALL = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, head_dim=128,
             max_position_embeddings=65536, tie_word_embeddings=False)


def plot(runs: list[dict], path: str) -> None:
    """Allocated memory (next to the cache's account) and per-token time over the decode
    steps, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, at) = plt.subplots(1, 2, figsize=(12, 4.0))
    for r in runs:
        label = r["method"] + (" (compiled)" if r.get("compiled") else "")
        if r["samples"]:
            pts = [(s, (m - r["baseline_allocated"]) / 2**20) for s, m in r["samples"]]
            ax.plot(*zip(*pts, strict=True), label=label, lw=1.2)
        win = r["time"]["window_ms"]
        if win:
            at.plot(*zip(*win, strict=True), "o-", ms=3, label=label, lw=1.2)
    r = runs[0]
    if r["samples"]:
        per_step = r["kv_cache_accounted"] / r["cached_tokens"] / 2**20
        steps = [s for s, _ in r["samples"]]
        ax.plot(steps, [(r["prompt_tokens"] + s) * per_step for s in steps], "k--",
                label="KV cache (account)")
    ax.set_xlabel("decode step")
    ax.set_ylabel("allocated over the model (MiB)")
    ax.set_title(f"memory of a {r['new_tokens']}-step generation, batch {r['batch']}"
                 + ("" if r["samples"] else " (not sampled off a GPU)"))
    if r["samples"]:
        ax.legend(fontsize=8)
    at.set_xlabel("decode step")
    at.set_ylabel("ms per token (window mean)")
    at.set_title("time per token")
    at.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str = "results", quick: bool = False, steps: int = 10000,
         methods: list[str] | None = None, prompt_tokens: int = 2048, seed: int = 0,
         modes: list[str] | None = None) -> int:
    """``nucleus-attn bench memory``: a long generation per method on a small random Llama
    (eager, and with ``modes=["compiled"]`` through ``enable(compile=True)``); writes
    ``bench_memory_<gpu>.json/.png``."""
    import json
    import os

    from .e2e import TINY, build_model
    from .kernels import gpu_label

    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type != "cuda" and not quick:
        print("nucleus-attn bench memory needs a CUDA GPU; use --quick for a CPU smoke test")
        return 2
    arch, dtype = (TINY, torch.float32) if quick else (SMALL, torch.bfloat16)
    steps = min(steps, 40) if quick else steps
    prompt_tokens = min(prompt_tokens, 64) if quick else prompt_tokens
    methods = methods or ["dense", "quest:budget=256", "twilight:p=0.95", "tactic:p=0.9",
                          "streaming"]
    modes = modes or ["eager"]
    model = build_model(dict(arch, max_position_embeddings=prompt_tokens + steps + 8), dtype,
                        device, seed)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"bench_memory_{gpu_label(device)}")
    meta = {"arch": arch, "dtype": str(dtype), "device": device.type, "torch": torch.__version__,
            "command": "nucleus-attn bench memory" + (" --quick" if quick else "")}
    runs = []
    from ..methods import parse_method
    from .generate import compile_config

    for mode, spec in ((m, s) for m in modes for s in methods):
        compiled = mode == "compiled"
        r = measure_growth(model, parse_method(spec), prompt_tokens=prompt_tokens,
                           new_tokens=steps, device=device, sample_every=max(1, steps // 100),
                           seed=seed, compile=compile_config(device) if compiled else False)
        r["compiled"] = compiled
        runs.append(r)
        t = r["time"]
        if t["window_ms"]:
            print(f"{r['method']:<22} {mode}: {t['first_window_ms']:.2f} ms/token in the first "
                  f"window, {t['last_window_ms']:.2f} in the last; fit "
                  f"{t['intercept_ms']:.2f} ms + {t['growth_ms_per_1k']:.3f} ms per 1k cached "
                  f"tokens; largest window over the fit {t['flatness']:.2f}x", flush=True)
        acct = r["accounting"]
        over = None
        if r["max_memory_allocated"] is not None:
            over = r["max_memory_allocated"] - r["baseline_allocated"]
        mib = {k: r[k] / 2**20 for k in ("kv_cache_bytes", "kv_cache_accounted", "state_bytes")}
        print(f"{r['method']:<22} {steps} steps in {r['elapsed_s']:.0f} s: KV cache "
              f"{mib['kv_cache_bytes']:.1f} MiB (account {mib['kv_cache_accounted']:.1f}), "
              f"method state {mib['state_bytes']:.1f} MiB (account "
              f"{acct['metadata_bytes'] / 2**20:.1f})"
              + ("" if over is None else f", peak over the model {over / 2**20:.1f} MiB"),
              flush=True)
        with open(stem + ".json", "w") as f:  # after every method: partial runs count
            json.dump({"meta": meta, "runs": runs}, f, indent=1)
    try:
        plot(runs, stem + ".png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'nucleus-attn[plot]')")
    print(f"wrote {stem}.json and {stem}.png")
    return 0
