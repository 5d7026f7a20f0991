"""``model.generate()`` on the GPU, what users run: the compiled switch (static cache,
``torch.compile(mode="reduce-overhead")``, CUDA graphs replayed with our attention op
inside) gives the eager tokens, also across requests and method switches (replays run no
Python: stale metadata or another method's recorded kernels would change tokens silently);
the warm-up call leaves no Triton kernel to compile for a request of its shape; eager
decode steps never synchronise with the host inside our attention; statistics count every
replayed step."""

from __future__ import annotations

import pytest
import torch

import nucleus_attn as na
from nucleus_attn.bench.e2e import build_model
from nucleus_attn.ops import _dispatch

transformers = pytest.importorskip("transformers")

DEV = torch.device("cuda")
#: A small Llama with Llama-3-8B's attention shape (Hq 32 / Hkv 8, d 128): compiles fast.
ARCH = dict(vocab_size=4096, hidden_size=4096, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
            max_position_embeddings=16384, tie_word_embeddings=False)
# dense_below=0: run the methods (the H200's crossover table runs them dense at N=4000)
SETTINGS = {"dense": {}, "streaming": {"sink": 4, "window": 252, "dense_below": 0},
            "quest": {"budget": 256, "dense_below": 0},
            "twilight": {"p": 0.9, "base_budget": 1024, "dense_below": 0},
            "tactic": {"p": 0.5, "dense_below": 0}}
N, NEW = 4000, 24


@pytest.fixture(scope="module")
def model():
    # float32: compiled (fused) and eager modules then round alike closely enough that
    # greedy tokens agree (in bf16 a near-tie of random-weight logits flips the argmax)
    return build_model(ARCH, torch.float32, DEV, 0)


def prompt(seed: int, n: int = N, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ARCH["vocab_size"], (batch, n), generator=g).to(DEV)


def generate(model, ids, mask=None, new=NEW, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def compiled_kernels() -> int:
    """Triton kernels compiled so far (entries of every nucleus-attn kernel's JIT cache)."""
    import importlib
    import pkgutil

    import nucleus_attn.ops as ops_pkg

    total = 0
    for info in pkgutil.iter_modules(ops_pkg.__path__):
        mod = importlib.import_module(f"nucleus_attn.ops.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, _dispatch.LazyKernel) and False in obj._jitted:
                for caches in obj._jitted[False].device_caches.values():
                    total += len(caches[0])
    return total


@pytest.mark.parametrize("method", list(SETTINGS))
def test_compiled_generate_matches_eager_across_requests(model, method):
    """Two requests of the same shape in a row (the second replays graphs recorded for the
    first, reading metadata rebuilt in place), compiled vs eager steps on a static cache."""
    a, b = prompt(1), prompt(2)
    with na.enable(model, method, dense_layers=1, **SETTINGS[method]):
        eager = [generate(model, x, cache_implementation="static") for x in (a, b)]
    with na.enable(model, method, dense_layers=1, compile=True, **SETTINGS[method]) as h:
        got = [generate(model, x) for x in (a, b)]
        resets = h.graph_resets
    for g, e in zip(got, eager, strict=True):
        # fused and eager float32 arithmetic differ in the last bits: a near-tie could
        # flip one greedy token (and the rest after it); nearly every step agrees
        agree = (g[:, N:] == e[:, N:]).float().mean().item()
        assert agree >= 0.9, f"{method}: compiled tokens agree on {agree:.2%} of the steps"
    if method in ("quest", "twilight", "streaming", "dense"):
        assert resets == 0  # same shapes: the second request reused the recorded graphs


def test_switching_methods_under_compile_records_again(model):
    """A graph recorded under Quest must not be replayed for Twilight."""
    a = prompt(3)
    outs = {}
    for method in ("quest", "twilight", "quest"):
        with na.enable(model, method, dense_layers=1, compile=True, **SETTINGS[method]):
            outs.setdefault(method, []).append(generate(model, a))
    with na.enable(model, "twilight", dense_layers=1, **SETTINGS["twilight"]):
        eager_twilight = generate(model, a, cache_implementation="static")
    agree = (outs["twilight"][0][:, N:] == eager_twilight[:, N:]).float().mean().item()
    assert agree >= 0.9
    assert torch.equal(outs["quest"][0], outs["quest"][1])


def test_stats_count_replayed_steps(model):
    with na.enable(model, "twilight", dense_layers=1, compile=True, stats=True,
                   **SETTINGS["twilight"]) as h:
        generate(model, prompt(4))
        s = h.summary()
    # every decode step, replayed or not, is counted on the device
    assert s["decode_rows"] == NEW - 1
    assert 0 < s["sparse_kept_fraction"] < 1
    assert all(layer.stats.missed_captures == 0 for layer in h._layers.values())


@pytest.mark.parametrize("method", ["quest", "twilight", "tactic", "streaming"])
def test_warmup_leaves_nothing_to_compile(model, method):
    with na.enable(model, method, dense_layers=1, **SETTINGS[method]) as h:
        h.warmup(prompt_tokens=N, new_tokens=NEW)
        before = compiled_kernels()
        generate(model, prompt(5))
        after = compiled_kernels()
    assert after == before, f"{method}: {after - before} kernels compiled after the warm-up"


@pytest.mark.parametrize("method", ["quest", "twilight", "tactic", "streaming"])
def test_eager_decode_attention_never_syncs(model, method):
    """Inside our attention function, eager decode steps after the first never wait for
    the GPU (torch's sync debug mode raises on any synchronising call)."""
    with na.enable(model, method, dense_layers=1, **SETTINGS[method]) as h:
        original = h._attend
        calls = {"n": 0}

        def attend(module, query, *args):
            if query.shape[2] > 1 or not h._layers[module.layer_idx].built:
                return original(module, query, *args)  # prefill, state build: may sync
            calls["n"] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return original(module, query, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        h._attend = attend
        generate(model, prompt(6), new=6)
    assert calls["n"] > 0


def test_first_step_after_warmup_is_short(model):
    """With kernels compiled, the first decode step (metadata build) costs a small fraction
    of the prefill (the issue's target: <= 10% at 32k and 128k; here at N=4000 a loose
    bound, the benchmark measures the real lengths)."""
    from nucleus_attn.bench.generate import timed_generate

    ids = prompt(7)
    with na.enable(model, "tactic", dense_layers=1, **SETTINGS["tactic"]) as h:
        h.warmup(prompt_tokens=N, new_tokens=8)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        t = timed_generate(model, ids, cache, 8, 4)
    assert t["first_step_s"] < max(0.5 * t["tail_prefill_s"], 0.05)
