"""Compiled decode steps allocate nothing that outlives them.

``torch.compile(mode="reduce-overhead")`` (what ``enable(compile=True)`` asks for) runs
every compiled step, its warm-up runs included, inside a private CUDA memory pool, and
raises ("Detected N tensor(s) in the cudagraph pool not tracked as outputs") when an
allocation made during the step is still alive after it without being an output. Our
attention op runs eager Python inside that step, so everything it keeps from one step to
the next (method state, the key span shared by the layers, statistics buffers) must be
made outside the steps, at the prefill, and only written in place by them.

The pool needs a GPU; this CPU test checks the same rule with a dispatch mode that records
every tensor an op allocates during a decode step (outputs whose storage is none of the
op's inputs': not views, not in-place or ``out=`` results) and lists those still alive
after it, the step's logits aside.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nucleus_attn as na

transformers = pytest.importorskip("transformers")

CASES = {  # as in test_generate_bench.CASES: real sparsity at prompts of ~40 tokens
    "dense": {},
    "streaming": {"sink": 2, "window": 8},
    "quest": {"budget": 16, "page_size": 8, "sink": 2, "window": 4},
    "twilight": {"p": 0.7, "base_budget": 24, "page_size": 8, "sink": 2, "window": 4},
    "tactic": {"p": 0.7, "cluster_size": 4, "iterations": 3, "sink": 2, "window": 4},
}
CACHE_LEN = 64


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class NewAllocations(TorchDispatchMode):
    """Records the tensors that ops allocate while active; :meth:`alive` lists those that
    survive (one entry per storage: the op that made it and its shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[weakref.ref, int, str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage(a) for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.numel() and _storage(o) not in inputs:
                self.made.append((weakref.ref(o), _storage(o), str(func), tuple(o.shape)))
        return out

    def alive(self, outputs: list[torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
        gc.collect()
        skip = {_storage(t) for t in outputs}
        found: dict[int, tuple[str, tuple[int, ...]]] = {}
        for ref, ptr, func, shape in self.made:
            if ref() is not None and ptr not in skip:
                found.setdefault(ptr, (func, shape))
        return list(found.values())


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=2048, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def compile_config():
    cfg = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager",
                                     mode=None)
    cfg._compile_all_devices = True
    return cfg


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("padded,diagnostics", [(False, False), (True, True)])
def test_compiled_steps_keep_no_new_allocation(llama, method, padded, diagnostics):
    """After an (eager) prefill, decode steps as the compiled path runs them (static cache,
    compiled mode) leave no allocation of theirs alive: batch 1 unpadded (no mask reaches
    the attention) and a left-padded batch of 2 (the mask path) with masses measured."""
    b, n = (2, 40) if padded else (1, 40)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (b, n), generator=g)
    mask = torch.zeros(b, CACHE_LEN, dtype=torch.long)
    mask[:, :n] = 1
    if padded:
        mask[1, :11] = 0
    with torch.no_grad(), na.enable(llama, method, dense_layers=1, compile=compile_config(),
                                    diagnostics=diagnostics, **CASES[method]) as handle:
        assert handle.compiled
        cache = transformers.StaticCache(config=llama.config, max_cache_len=CACHE_LEN)
        out = llama(input_ids=ids, attention_mask=mask[:, :n], past_key_values=cache,
                    use_cache=True, cache_position=torch.arange(n))
        token = out.logits[:, -1:].argmax(-1)
        for step in range(3):
            pos = n + step
            mask[:, pos] = 1
            with NewAllocations() as made:
                out = llama(input_ids=token, attention_mask=mask, past_key_values=cache,
                            use_cache=True, cache_position=torch.tensor([pos]))
            alive = made.alive([out.logits])
            assert not alive, f"{method}, step {step}: kept alive after the step: {alive}"
            token = out.logits[:, -1:].argmax(-1)
        summary = handle.summary()
    assert summary["decode_rows"] == 3 * b  # every step counted
    if method != "dense":
        assert 0 < summary["sparse_kept_fraction"] < 1
        assert (summary["sparse_mass"] is not None) == diagnostics


def test_plain_enable_keeps_generate_eager(llama):
    """Plain enable(): transformers' own compilation of static-cache decode steps is off
    while enabled (see hf._keep_eager), and restored by disable()."""
    gen = llama.generation_config
    before = getattr(gen, "disable_compile", None)
    with na.enable(llama, "quest", budget=16, page_size=8):
        assert gen.disable_compile is True
    assert getattr(gen, "disable_compile", None) == before
    with na.enable(llama, "quest", budget=16, page_size=8, compile=compile_config()):
        assert not gen.disable_compile
        assert gen.cache_implementation == "static"


def test_graphs_are_dropped_only_after_recorded_steps(llama, monkeypatch):
    """Switching handles drops recorded CUDA graphs with torch.compiler.reset() (the only
    way to drop a compiled function's graphs: shutting its cudagraph tree down makes its
    next call fail), and only when compiled steps ran on a GPU since the last reset."""
    from nucleus_attn.integrations import compiled

    calls = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append(1))
    compiled.take_recorded()
    with na.enable(llama, "quest", budget=16, page_size=8):
        pass
    assert calls == []  # nothing was recorded: no recompilation
    compiled._RECORDED[0] = True  # what a compiled step of a compile= handle on a GPU sets
    with na.enable(llama, "quest", budget=16, page_size=8):
        assert calls == [1]
    assert calls == [1] and not compiled.take_recorded()
