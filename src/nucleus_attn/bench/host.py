"""``nucleus-attn bench host``: what an eager decode step costs the host, per layer and method.

Eager ``model.generate()`` is bound by host work: every torch op and every Triton launch
costs the CPU several microseconds whatever the GPU does. This module measures that work on
any machine (no GPU needed) with a small random Llama and a few thousand cached tokens:

- **counts** per decode step, split into the model's own work and each attention layer's
  (dense and sparse layers apart): aten ops dispatched, tensors allocated, Triton launches,
  and host syncs (``.item()``/``bool()``/``int()`` on a tensor, ``tolist``, ``nonzero``,
  boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``unique``...).
  Triton launches are counted in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
  ``NUCLEUS_ATTN_BACKEND=triton``): the ops and launches are the GPU path's, only slower;
- **time** per layer call of the attention function on the torch references (interpreter
  off), against the ``dense`` method's;
- **specialisations**: the Triton cache key of every launch (constexpr values, and the
  ``== 1`` / ``% 16 == 0`` / 32- or 64-bit specialisation Triton gives each int and pointer
  argument), over many steps of a growing cache. A key field that changes with N is a
  kernel compilation during generation; the report lists those fields with the launcher's
  file and line.

The GPU cost is then *predicted* (not measured) as ``ops * OP_US + launches * LAUNCH_US``
(typical eager costs of a CUDA torch op and of a Triton launch from Python).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Predicted eager host cost of one CUDA torch op (dispatch + launch), microseconds.
OP_US = 6.0
#: Predicted eager host cost of one Triton launch from Python (argument binding, cache key,
#: launch), microseconds.
LAUNCH_US = 20.0
#: Predicted host cost of a view op (no kernel) and of an uninitialised allocation.
VIEW_US = 1.5
EMPTY_US = 2.5
EMPTY_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}

#: aten ops that wait for the device (their result is read on the host, or their output
#: shape depends on the data).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
            "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero",
            "argwhere", "nonzero_static_unsafe"}


@dataclass
class Tally:
    """Counts of one scope (the model, or one kind of attention layer)."""

    calls: int = 0  # attention layer calls (0 for the model scope)
    ops: int = 0  # every aten op
    views: int = 0  # of which views (no kernel, no allocation)
    empties: int = 0  # of which uninitialised allocations (no kernel)
    allocs: int = 0  # tensors allocated (every non-view, out-of-place op)
    launches: int = 0
    syncs: int = 0
    seconds: float = 0.0
    op_names: Counter = field(default_factory=Counter)
    sync_sites: Counter = field(default_factory=Counter)
    launch_names: Counter = field(default_factory=Counter)
    op_sites: Counter = field(default_factory=Counter)  # "file:line op" of every op

    def as_dict(self, steps: int) -> dict[str, Any]:
        per = max(self.calls, 1) if self.calls else max(steps, 1)
        kernels = self.ops - self.views - self.empties
        predicted = (kernels * OP_US + self.views * VIEW_US + self.empties * EMPTY_US
                     + self.launches * LAUNCH_US)
        return {
            "calls": self.calls,
            "ops": self.ops / per, "kernel_ops": kernels / per, "views": self.views / per,
            "empties": self.empties / per, "allocs": self.allocs / per,
            "launches": self.launches / per, "syncs": self.syncs / per,
            "host_us": 1e6 * self.seconds / per if self.seconds else None,
            "predicted_gpu_host_us": predicted / per,
            "top_ops": {k: v / per for k, v in self.op_names.most_common(16)},
            "sync_sites": dict(self.sync_sites),
            "launch_names": {k: v / per for k, v in self.launch_names.items()},
            "op_sites": {k: v / per for k, v in sorted(self.op_sites.items())},
        }


def _caller_site(skip: tuple[str, ...] = ("torch/", "bench/host.py", "contextlib")) -> str:
    """``file:line`` of the innermost frame outside torch and this module."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not any(s in name for s in skip):
            return f"{_short(name)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _short(path: str) -> str:
    for marker in ("nucleus_attn/", "transformers/"):
        if marker in path:
            return marker + path.split(marker, 1)[1]
    return os.path.basename(path)


class HostCounter(TorchDispatchMode):
    """Counts aten ops, allocations and host syncs, per scope (see :meth:`scope`).

    Ops dispatched inside a Triton launch (the interpreter's own tensor work) are not
    counted: on a GPU a launch is one call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.current = "model"
        self.in_launch = 0
        self.enabled = True
        self.n = 0  # cache length of the current step (for the launch records)
        self.step = 0  # decode step (0: the first after the prefill)

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def note_sync(self, what: str) -> None:
        if self.enabled and not self.in_launch:
            t = self.tallies[self.current]
            t.syncs += 1
            t.sync_sites[f"{what} at {_caller_site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.enabled and not self.in_launch:
            t = self.tallies[self.current]
            name = func.overloadpacket.__name__
            t.ops += 1
            t.op_names[name] += 1
            if self.current != "model":
                t.op_sites[f"{_caller_site()} {name}"] += 1
            # an aliasing op (to, contiguous, reshape...) is a view only when it did alias
            view = func.is_view and _aliases(out, args)
            if view:
                t.views += 1
            elif name in EMPTY_OPS:
                t.empties += 1
            if not view and not func._schema.is_mutable:
                t.allocs += 1
            sync = name in SYNC_OPS
            if name == "index" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 else ())):
                sync = True
                name = "boolean-mask index"
            if name == "repeat_interleave" and kwargs.get("output_size") is None and \
                    isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
                sync = True
            if sync:
                t.syncs += 1
                t.sync_sites[f"{name} at {_caller_site()}"] += 1
        return out


def _aliases(out: Any, args: tuple) -> bool:
    first = args[0] if args else None
    if not isinstance(out, torch.Tensor) or not isinstance(first, torch.Tensor):
        return True
    return out.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()


# --- Triton launches and their cache keys ----------------------------------------------------

@dataclass
class Launch:
    """One Triton launch: the kernel, where it was launched from, and its cache key."""

    kernel: str
    site: str
    key: tuple[tuple[str, Any], ...]  # (parameter, specialisation) in signature order
    scope: str
    n: int = 0  # the cache length of the step
    step: int = 0  # the decode step (0: the first after the prefill)


def specialisation_key(fn: Any, args: tuple, kwargs: dict) -> tuple[tuple[str, Any], ...]:
    """Triton 3.6's cache key of a launch of ``fn`` (the undecorated kernel function):
    constexpr values, the type and ``D``/``1`` specialisation of every other argument
    (``native_specialize_impl``, the function Triton's own binder calls), and the launch
    options (``num_warps``...)."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    key = []
    for name, param in sig.parameters.items():
        value = bound.arguments.get(name)
        if "constexpr" in str(param.annotation):
            key.append((name, ("constexpr", value)))
        else:
            spec = native_specialize_impl(BaseBackend, value, False, True, True)
            key.append((name, tuple(spec)))
    for k in sorted(kwargs):
        if k not in sig.parameters:
            key.append((k, ("option", kwargs[k])))
    return tuple(key)


@contextlib.contextmanager
def record_launches(counter: HostCounter | None, sink: list[Launch]) -> Iterator[None]:
    """Record every launch of a nucleus-attn Triton kernel (``LazyKernel[grid](...)``)."""
    from ..ops import _dispatch

    original = _dispatch.LazyKernel.__getitem__

    def getitem(self: Any, grid: Any) -> Any:
        launch = original(self, grid)
        site = _caller_site(skip=("torch/", "bench/host.py", "ops/_dispatch.py"))

        def run(*args: Any, **kwargs: Any) -> Any:
            scope = counter.current if counter is not None else "?"
            sink.append(Launch(self.fn.__name__, site, specialisation_key(self.fn, args, kwargs),
                               scope, counter.n if counter is not None else 0,
                               counter.step if counter is not None else 0))
            if counter is None:
                return launch(*args, **kwargs)
            if counter.enabled:
                t = counter.tallies[counter.current]
                t.launches += 1
                t.launch_names[self.fn.__name__] += 1
            counter.in_launch += 1  # the interpreter's own tensor work is not counted
            try:
                return launch(*args, **kwargs)
            finally:
                counter.in_launch -= 1

        return run

    _dispatch.LazyKernel.__getitem__ = getitem  # type: ignore[method-assign]
    try:
        yield
    finally:
        _dispatch.LazyKernel.__getitem__ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def count_tolist(counter: HostCounter) -> Iterator[None]:
    """``Tensor.tolist`` reads the data without an aten op: count it as a sync."""
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        counter.note_sync("tolist")
        return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]


def recompilations(launches: list[Launch], settle: int = 2) -> list[dict[str, Any]]:
    """Per launch site, the cache keys first seen after the first ``settle`` decode steps
    (each is a compilation in the middle of a generation on a GPU), with the key fields
    that differ from the keys seen before and the cache lengths where they appeared."""
    by_site: dict[tuple[str, str], list[Launch]] = defaultdict(list)
    for launch in launches:
        by_site[(launch.kernel, launch.site)].append(launch)
    out = []
    for (kernel, site), group in sorted(by_site.items()):
        first: dict[tuple, int] = {}
        for launch in group:
            first.setdefault(launch.key, launch.step)
        early = [k for k, step in first.items() if step < settle]
        late = [(k, step) for k, step in first.items() if step >= settle]
        changed: dict[str, set[str]] = defaultdict(set)
        at_n = []
        for key, _ in late:
            at_n.append(next(x.n for x in group if x.key == key))
            ref = early[0] if early else late[0][0]
            for (name, a), (_, b) in zip(ref, key, strict=False):
                if a != b:
                    changed[name].update((_spec_str(a), _spec_str(b)))
        out.append({"kernel": kernel, "site": site, "launches": len(group),
                    "keys_at_start": len(early), "new_keys_later": len(late),
                    "new_key_at_n": at_n[:12],
                    "changed": {k: sorted(v) for k, v in changed.items()}})
    return out


def _spec_str(spec: Any) -> str:
    kind, value = spec if isinstance(spec, tuple) and len(spec) == 2 else (spec, None)
    if kind == "constexpr":
        return f"={value}"
    if kind == "option":
        return f"opt={value}"
    return f"{kind}{'/' + value if value else ''}"


# --- one method ------------------------------------------------------------------------------

def _tiny_llama(layers: int, seed: int, max_len: int, device: str = "cpu") -> Any:
    from .e2e import TINY, build_model

    arch = dict(TINY, num_hidden_layers=layers, max_position_embeddings=max_len)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return build_model(arch, dtype, torch.device(device), seed)


def _decode_steps(model: Any, ids: torch.Tensor, steps: int,
                  on_step: Any = None, cache_implementation: str | None = None) -> None:
    """Prefill ``ids`` then run ``steps`` decode steps through ``generate`` (greedy)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Hook(LogitsProcessor):
        def __init__(self) -> None:
            self.step = 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if on_step is not None:
                on_step(self.step, input_ids.shape[1])
            self.step += 1
            return scores

    kw = {} if cache_implementation is None else {"cache_implementation": cache_implementation}
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=steps + 1, min_new_tokens=steps + 1, pad_token_id=0,
                       logits_processor=LogitsProcessorList([Hook()]), **kw)


def profile_method(model: Any, spec: str, prompt: int, steps: int, *, warm: int = 2,
                   timing: bool = False, launches: list[Launch] | None = None,
                   seed: int = 0, cache_implementation: str | None = None) -> dict[str, Any]:
    """Counts (or, with ``timing``, host seconds) of ``steps`` eager decode steps of
    ``spec`` after a ``prompt``-token prefill and ``warm`` uncounted decode steps."""
    import nucleus_attn as na

    from ..methods import parse_method

    cfg = parse_method(spec)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=g).to(model.device)
    counter = HostCounter()
    counter.enabled = False
    handle = na.enable(model, cfg, dense_layers=min(2, model.config.num_hidden_layers - 1))
    original = handle._attend
    state: dict[str, Any] = {"counting": False, "last": 0.0}
    counter.n = prompt

    def attend(module: Any, query: torch.Tensor, *args: Any) -> Any:
        layer = handle._layers[module.layer_idx]
        scope = f"{layer.stats.kind} layer"
        if not state["counting"] or query.shape[2] > 1:
            return original(module, query, *args)
        start = time.perf_counter()
        with counter.scope(scope):
            out = original(module, query, *args)
        t = counter.tallies[scope]
        t.calls += 1
        if timing:
            t.seconds += time.perf_counter() - start
        return out

    def on_step(step: int, n: int) -> None:
        # called after each token: step 0 follows the prefill
        counter.n, counter.step = n, step
        now = time.perf_counter()
        if state["counting"] and timing:  # host time of the whole step just finished
            counter.tallies["step"].seconds += now - state["last"]
        state["last"] = now
        state["counting"] = counter.enabled = warm <= step < warm + steps

    handle._attend = attend  # type: ignore[method-assign]
    sink: list[Launch] = [] if launches is None else launches
    try:
        ctx = contextlib.ExitStack()
        if not timing:
            ctx.enter_context(counter)
            ctx.enter_context(count_tolist(counter))
            ctx.enter_context(record_launches(counter, sink))
        with ctx:
            _decode_steps(model, ids, warm + steps, on_step, cache_implementation)
        summary = handle.summary()
    finally:
        handle.disable()
    return {
        "method": spec,
        "kept_fraction": summary["sparse_kept_fraction"],
        "scopes": {name: t.as_dict(steps) for name, t in sorted(counter.tallies.items())},
    }


def _print_counts(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    where = "measured host us (CUDA)" if torch.cuda.is_available() else "torch-path CPU us"
    for col in ("method", "scope", "torch kernels", "views", "empty", "allocs",
                "Triton launches", "syncs", "predicted GPU host us", where):
        table.add_column(col, justify="left" if col in ("method", "scope") else "right")
    for r in rows:
        for scope, d in r["scopes"].items():
            if scope == "step":
                table.add_row(r["method"], "whole step", *[""] * 7, f"{d['host_us']:.0f}")
                continue
            table.add_row(r["method"], scope, f"{d['kernel_ops']:.1f}", f"{d['views']:.1f}",
                          f"{d['empties']:.1f}", f"{d['allocs']:.1f}",
                          f"{d['launches']:.1f}", f"{d['syncs']:.1f}",
                          f"{d['predicted_gpu_host_us']:.0f}",
                          "-" if d.get("host_us") is None else f"{d['host_us']:.0f}")
    Console(width=160).print(table)


DEFAULT_METHODS = ["dense", "streaming:sink=4,window=60", "quest:budget=64",
                   "twilight:p=0.9", "tactic:p=0.9"]


def run_counts(methods: list[str], prompt: int, steps: int, layers: int, seed: int,
               grow_steps: int) -> dict[str, Any]:
    """Counts and launch keys in Triton's interpreter (call with TRITON_INTERPRET=1 set
    before triton was imported)."""
    os.environ["NUCLEUS_ATTN_BACKEND"] = "triton"
    model = _tiny_llama(layers, seed, prompt + max(steps, grow_steps) + 64)
    torch.set_num_threads(1)
    rows, keys = [], {}
    for spec in methods:
        rows.append(profile_method(model, spec, prompt, steps, seed=seed))
        # keys over a longer growing run: which launches recompile as N grows
        launches: list[Launch] = []
        profile_method(model, spec, prompt, grow_steps, warm=0, launches=launches, seed=seed)
        keys[spec] = recompilations(launches)
    return {"counts": rows, "specialisations": keys}


def run_timing(methods: list[str], prompt: int, steps: int, layers: int, seed: int,
               repeats: int) -> list[dict[str, Any]]:
    """Host seconds per attention call and per step: on a GPU the real eager path (Triton
    kernels; a tiny model, so that the host, not the GPU, sets the pace), elsewhere the torch
    references (CPU compute included)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["NUCLEUS_ATTN_BACKEND"] = "torch"
    model = _tiny_llama(layers, seed, prompt + steps + 64, "cuda" if cuda else "cpu")
    torch.set_num_threads(1)
    best: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):  # interleaved and repeated: keep each scope's fastest run
        for spec in methods:
            # 18 warm steps: every kernel specialisation of the growing cache compiled first
            r = profile_method(model, spec, prompt, steps, warm=18, timing=True, seed=seed)
            old = best.get(spec)
            if old is None:
                best[spec] = r
                continue
            for scope, d in r["scopes"].items():
                if d["host_us"] is not None and d["host_us"] < old["scopes"][scope]["host_us"]:
                    old["scopes"][scope]["host_us"] = d["host_us"]
    return list(best.values())


def _write_timing(out: str, timing: list[dict], prompt: int, steps: int, layers: int) -> int:
    """On a GPU: the measured host time per layer call and per step (the op counts do not
    depend on the device: ``bench host`` on a CPU gives them)."""
    from rich.console import Console
    from rich.table import Table

    from .kernels import gpu_label

    table = Table(title=f"measured host time of eager decode steps, {torch.cuda.get_device_name()}"
                        f" (tiny Llama x{layers}, N={prompt}, best of interleaved repeats)")
    for col in ("method", "scope", "host us per call", "vs dense"):
        table.add_column(col, justify="left" if col in ("method", "scope") else "right")
    dense = next((r for r in timing if r["method"] == "dense"), None)
    for r in timing:
        for scope, d in sorted(r["scopes"].items()):
            ref = None if dense is None else dense["scopes"].get(
                "dense layer" if scope.endswith("layer") else scope, {}).get("host_us")
            rel = "" if not ref or d["host_us"] is None else f"{d['host_us'] / ref:.1f}x"
            table.add_row(r["method"], scope, f"{d['host_us']:.0f}", rel)
    Console(width=140).print(table)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"bench_host_{gpu_label(torch.device('cuda'))}.json")
    with open(path, "w") as f:
        json.dump({"meta": {"prompt": prompt, "steps": steps, "layers": layers,
                            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                            "command": "nucleus-attn bench host"}, "timing": timing}, f, indent=1)
    print(f"wrote {path}")
    return 0


def main(out: str = "results", quick: bool = False, methods: list[str] | None = None,
         prompt: int | None = None, steps: int | None = None, seed: int = 0,
         counts: bool = False) -> int:
    """Print the per-layer host cost tables and write ``bench_host_<gpu|cpu>.json``.

    On a GPU only the host time is measured (real Triton launches), unless ``counts``: the
    op/launch/sync counts and kernel specialisations come from Triton's CPU interpreter in
    a subprocess (slow: minutes per method at a few thousand tokens)."""
    methods = methods or DEFAULT_METHODS
    prompt = prompt or (200 if quick else 2030)  # growth crosses N = 2048
    steps = steps or (2 if quick else 8)
    layers = 3 if quick else 4
    grow_steps = 4 if quick else 48
    repeats = 1 if quick else 3
    timing = run_timing(methods, prompt, steps, layers, seed, repeats)
    if torch.cuda.is_available() and not counts:
        return _write_timing(out, timing, prompt, steps, layers)
    # the interpreter must be chosen before triton is imported: a fresh process
    env = dict(os.environ, TRITON_INTERPRET="1", NUCLEUS_ATTN_BACKEND="triton")
    args = json.dumps({"methods": methods, "prompt": prompt, "steps": steps, "layers": layers,
                       "seed": seed, "grow_steps": grow_steps})
    proc = subprocess.run([sys.executable, "-m", "nucleus_attn.bench.host", args],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        return 1
    counted = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in counted["counts"]:
        t = next(r for r in timing if r["method"] == row["method"])
        for scope, d in row["scopes"].items():
            if scope in t["scopes"]:
                d["host_us"] = t["scopes"][scope]["host_us"]
        if "step" in t["scopes"]:
            row["scopes"]["step"] = t["scopes"]["step"]
    _print_counts(counted["counts"],
                  f"host work per eager decode step (CPU, tiny Llama x{layers} layers, N={prompt}; "
                  "per attention-layer call, 'model' per step; GPU host us predicted as "
                  f"{OP_US:.0f} us/torch kernel, {VIEW_US} us/view, {EMPTY_US} us/empty, "
                  f"{LAUNCH_US:.0f} us/Triton launch)")
    print("\nTriton launches compiled again during generation (a cache key first seen after "
          "the first 2 decode steps: a compilation mid-request on a GPU):")
    for spec, sites in counted["specialisations"].items():
        for s in sites:
            if s["new_keys_later"]:
                fields_ = "; ".join(f"{k}: {' / '.join(v)}" for k, v in s["changed"].items())
                print(f"  {spec:<28} {s['kernel']:<32} {s['site']:<36} "
                      f"+{s['new_keys_later']} keys (at N={s['new_key_at_n'][:4]}): {fields_}")
    os.makedirs(out, exist_ok=True)
    from .kernels import gpu_label

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = os.path.join(out, f"bench_host_{gpu_label(device)}.json")
    meta = {"prompt": prompt, "steps": steps, "layers": layers, "op_us": OP_US,
            "view_us": VIEW_US, "empty_us": EMPTY_US, "launch_us": LAUNCH_US,
            "torch": torch.__version__, "command": "nucleus-attn bench host"
            + (" --quick" if quick else "")}
    with open(path, "w") as f:
        json.dump({"meta": meta, **counted}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # the interpreter half of main(), in its own process
    params = json.loads(sys.argv[1])
    result = run_counts(**params)
    print(json.dumps(result, default=str))
