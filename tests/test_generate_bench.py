"""What users run: ``model.generate()`` through ``enable()``, eager and compiled.

- ``nucleus-attn bench generate --quick`` (CPU smoke: a tiny random Llama, every row);
- the compiled switch (``enable(compile=...)``): a static cache and the decode step under
  ``torch.compile(fullgraph=True)`` (``aot_eager`` on CPU: tracing without graph breaks),
  giving the eager tokens, also for a second request into the same buffers;
- the warm-up call: after it, a request of the same shape launches no Triton kernel with
  a cache key (constexprs and Triton's integer/pointer specialisations) not compiled yet;
- the statistics' ring buffer and the host-work accounting of ``bench host``.
"""

from __future__ import annotations

import json

import pytest
import torch
from ops_helpers import interpreter

import nucleus_attn as na
from nucleus_attn import cli

transformers = pytest.importorskip("transformers")

from nucleus_attn.bench import host  # noqa: E402
from nucleus_attn.decode import DecodeInfo  # noqa: E402
from nucleus_attn.integrations import hf  # noqa: E402
from nucleus_attn.integrations.stats import RING_STEPS, LayerStats  # noqa: E402

PAD = 0
CASES = {  # real sparsity at prompts of ~40 tokens (as in test_hf.HF_CASES)
    "dense": {},
    "streaming": {"sink": 2, "window": 8},
    "quest": {"budget": 16, "page_size": 8, "sink": 2, "window": 4},
    "twilight": {"p": 0.7, "base_budget": 24, "page_size": 8, "sink": 2, "window": 4},
    "tactic": {"p": 0.7, "cluster_size": 4, "iterations": 3, "sink": 2, "window": 4},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, mask=None, new=12, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=PAD, **kw)


def cpu_compile_config():
    """transformers compiles generate's decode step on CPU only when told to."""
    cfg = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager",
                                     mode=None)
    cfg._compile_all_devices = True
    return cfg


# --- bench generate --quick ----------------------------------------------------------------

def test_bench_generate_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "generate", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_generate_cpu.json").read_text())
    assert (tmp_path / "bench_generate_cpu.png").stat().st_size > 0
    rows = {r["label"]: r for r in data["rows"]}
    assert {"stock sdpa", "dense"} <= set(rows)
    assert {r["spec"].split(":")[0] for r in data["rows"] if r["kind"] == "method"} == {
        "quest", "twilight", "tactic", "streaming"}
    for r in data["rows"]:
        assert r["mode"] == "eager" and r["n"] == 96
        assert r["prefill_s"] > 0 and r["first_step_s"] > 0 and r["steady_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(1 / r["steady_s"])
        assert len(r["runs"][0]["steps_s"]) == data["meta"]["new_tokens"] - 1
        if r["kind"] == "method":
            assert 0 < r["kept_fraction"] < 1  # measured on the warm-up generation
            assert r["kept_fraction"] < r["kept_fraction_all_layers"] < 1
        else:
            assert r["kept_fraction"] == 1.0
    assert rows["dense"]["speedup_vs_dense"] == 1.0
    assert "tok/s" in capsys.readouterr().out


# --- the compiled switch -----------------------------------------------------------------

@pytest.mark.parametrize("method", list(CASES))
def test_compiled_generate_gives_the_eager_tokens(llama, method):
    """Static cache + the decode step compiled with fullgraph=True (any graph break would
    raise): the same tokens as eager steps, for two requests in a row (the second rebuilds
    the metadata into the first one's buffers, which replayed CUDA graphs would read)."""
    a, b = prompt(40, 1), prompt(40, 2)
    with na.enable(llama, method, dense_layers=1, **CASES[method]) as handle:
        eager = [generate(llama, a), generate(llama, b)]
        dynamic_kept = handle.summary()["sparse_kept_fraction"]
    with na.enable(llama, method, dense_layers=1, compile=cpu_compile_config(),
                   **CASES[method]) as handle:
        assert llama.generation_config.cache_implementation == "static"
        first = generate(llama, a)
        layer = handle._layers[2]
        ptrs = _data_ptrs(layer.state)
        second = generate(llama, b)
        if method in ("quest", "twilight", "tactic"):  # same shapes: rebuilt in place
            assert _data_ptrs(layer.state) == ptrs
            assert handle.graph_resets == 0
        assert handle.compiled
        s = handle.summary()
    assert torch.equal(first, eager[0]) and torch.equal(second, eager[1])
    if method == "dense":
        assert s["mean_kept_fraction"] == 1.0
    else:
        assert s["sparse_kept_fraction"] == pytest.approx(dynamic_kept, rel=0.25)
    # disable() restores the generation config
    assert llama.generation_config.cache_implementation is None
    assert llama.generation_config.compile_config is None


def _data_ptrs(state) -> list[int]:
    import dataclasses

    out = []
    for f in dataclasses.fields(state) if dataclasses.is_dataclass(state) else ():
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor):
            out.append(v.data_ptr())
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += _data_ptrs(v)
    return out


def test_compiled_generate_left_padded_batch(llama):
    from torch._dynamo.utils import counters

    a, b = prompt(40, 3), prompt(27, 4)
    ids = torch.full((2, 40), PAD)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 13:], mask[1, 13:] = b[0], 1
    with na.enable(llama, "twilight", dense_layers=1, **CASES["twilight"]):
        eager = generate(llama, ids, mask)
    with na.enable(llama, "twilight", dense_layers=1, compile=cpu_compile_config(),
                   **CASES["twilight"]):
        graphs = counters["stats"]["unique_graphs"]
        out = generate(llama, ids, mask)
        again = generate(llama, ids, mask)
        assert counters["stats"]["unique_graphs"] - graphs <= 1  # no recompile per step
    assert torch.equal(out, eager) and torch.equal(again, eager)


def test_compile_argument_is_checked(llama):
    with pytest.raises(TypeError, match="compile='yes'"):
        na.enable(llama, "quest", compile="yes")
    assert llama.config._attn_implementation == "sdpa"


def test_compiled_op_falls_back_to_sdpa_without_a_handle(llama):
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 9, 32)
    out = torch.ops.nucleus_attn.attend(q, k, k, None, 10**9, 0, 0.0, None, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))


# --- the warm-up call ----------------------------------------------------------------------

pytestmark_interp = pytest.mark.usefixtures(interpreter.__name__)


@pytestmark_interp
def test_warmup_compiles_every_kernel_a_request_uses(monkeypatch):
    """After warmup(prompt, new_tokens), a request of that shape (other tokens) launches no
    Triton kernel whose cache key the warm-up did not already compile; after a warm-up of
    too few steps the same request does (so the check can fail). Twilight: page bounds,
    int4 keys, top-p and the gathered attention kernels."""
    monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", "triton")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    n, new = 24, 17  # the cache grows from 25 to 41: both residues of N mod 16 that matter
    params = dict(CASES["twilight"], base="quest", base_budget=16)

    def launches(fn) -> list[host.Launch]:
        out: list[host.Launch] = []
        with host.record_launches(None, out):
            fn()
        return out

    with na.enable(model, "twilight", dense_layers=1, **params) as handle:
        info = {}
        warm = launches(lambda: info.update(handle.warmup(prompt_tokens=n, new_tokens=new)))
        assert handle.summary()["decode_rows"] == 0  # the warm-up's statistics are dropped
        request = launches(lambda: generate(model, prompt(n, 9), new=new))
        assert handle.summary()["sparse_kept_fraction"] < 1.0
        short = launches(lambda: handle.warmup(prompt_tokens=n, new_tokens=2))
    assert info["runs"][0]["prompt_tokens"] == n and info["seconds"] > 0
    assert {"_page_scores_kernel", "_int4_estimates_kernel", "_level1_kernel",
            "_write_kernel", "_sparse_attention_split_kernel"} <= {x.kernel for x in request}
    seen = {(x.kernel, x.key) for x in warm}
    missing = {(x.kernel, x.site) for x in request if (x.kernel, x.key) not in seen}
    assert not missing, f"compiled during the request after warm-up: {sorted(missing)}"
    seen_short = {(x.kernel, x.key) for x in short}
    assert any((x.kernel, x.key) not in seen_short for x in request)


def test_warmup_arguments(llama):
    with na.enable(llama, "quest", dense_layers=1, **CASES["quest"]) as handle:
        with pytest.raises(ValueError, match="new_tokens=0"):
            handle.warmup(prompt_tokens=30, new_tokens=0)
        with pytest.raises(ValueError, match="padded=True needs batch >= 2"):
            handle.warmup(prompt_tokens=30, padded=True)
        out = handle.warmup(prompt_tokens=[30, 20], new_tokens=3, batch=2, padded=True)
        assert [r["prompt_tokens"] for r in out["runs"]] == [30, 20]
    with pytest.raises(ValueError, match="disabled"):
        handle.warmup(prompt_tokens=30)


# --- statistics ----------------------------------------------------------------------------

def test_stats_ring_folds_to_exact_means():
    """More steps than the ring holds, batch and head count fixed, inside and outside
    inference mode: the summary equals the means computed directly."""
    g = torch.Generator().manual_seed(0)
    stats = LayerStats(3, "sparse", 4, 2)
    kept_all, frac_all = [], []
    for step in range(2 * RING_STEPS + 7):
        lengths = torch.tensor([50 + step, 30 + step])
        kept = torch.randint(1, 30, (2, 2), generator=g)
        mass = torch.rand(2, 4, generator=g)
        ctx = torch.inference_mode() if step % 3 else torch.no_grad()
        with ctx:
            stats.add(DecodeInfo(kept, kept, lengths, mass))
        kept_all.append(kept.double())
        frac_all.append(kept.double() / lengths[:, None].double())
    d = stats.as_dict()
    frac = torch.stack(frac_all)
    assert d["decode_rows"] == 2 * (2 * RING_STEPS + 7)
    assert d["kept_fraction_per_head"] == pytest.approx(frac.mean((0, 1)).tolist())
    assert d["mean_kept_fraction"] == pytest.approx(frac.mean().item())
    assert d["std_kept_fraction"] == pytest.approx(frac.std(unbiased=False).item(), rel=1e-6)
    assert d["mean_kept_tokens"] == pytest.approx(torch.stack(kept_all).mean().item())
    stats.reset()
    assert stats.as_dict()["decode_rows"] == 0


def test_stats_cost_one_op_per_sparse_layer(llama):
    """Recording statistics adds one device op per sparse layer and step (it was seven)."""
    counts = {}
    for on in (False, True):
        counter = host.HostCounter()
        with na.enable(llama, "streaming", dense_layers=1, stats=on, **CASES["streaming"]):
            generate(llama, prompt(40, 5), new=2)  # warm: ring allocated
            with counter:
                generate(llama, prompt(40, 6), new=2)
        counts[on] = counter.tallies["model"].ops - counter.tallies["model"].views
    layers, steps = 2, 1
    assert counts[True] - counts[False] == layers * steps


# --- host-work accounting (bench host) ---------------------------------------------------

def test_host_counter_finds_syncs_and_allocations():
    counter = host.HostCounter()
    x = torch.arange(10)
    with counter, host.count_tolist(counter):
        y = x[x > 3]  # boolean mask: a sync
        _ = int(y.sum())  # a sync
        _ = x.tolist()  # a sync
        x.view(2, 5).add(1)  # a view, then an allocation
    t = counter.tallies["model"]
    assert t.syncs == 3
    assert t.views >= 1 and t.allocs >= 3
    assert any("boolean-mask index" in k for k in t.sync_sites)


def test_specialisation_key_and_recompilations():
    pytest.importorskip("triton")

    import triton.language as tl

    def fn(x_ptr, n, m, BLOCK: tl.constexpr):  # noqa: N803
        pass

    x = torch.zeros(64)
    k16 = host.specialisation_key(fn, (x, 32, 1), {"BLOCK": 64, "num_warps": 4})
    k17 = host.specialisation_key(fn, (x, 33, 1), {"BLOCK": 64, "num_warps": 4})
    assert dict(k16)["BLOCK"] == ("constexpr", 64) and dict(k16)["m"] == ("constexpr", 1)
    assert dict(k16)["n"] == ("i32", "D") and dict(k17)["n"] == ("i32", "")
    launches = [host.Launch("fn", "ops/x.py:1", k16, "sparse layer", 100, 0),
                host.Launch("fn", "ops/x.py:1", k16, "sparse layer", 101, 1),
                host.Launch("fn", "ops/x.py:1", k17, "sparse layer", 102, 2)]
    (site,) = host.recompilations(launches)
    assert site["new_keys_later"] == 1 and site["new_key_at_n"] == [102]
    assert set(site["changed"]) == {"n"}


def test_compiled_handle_is_exclusive_and_leaves_no_trace(llama):
    with na.enable(llama, "quest", compile=cpu_compile_config()) as handle:
        assert handle.compiled
        with pytest.raises(ValueError, match="already enabled"):
            na.enable(llama, "quest")
    assert hf._OWNER.get(next(iter(handle._modules))) is None


# --- the lean e2e step ---------------------------------------------------------------------

def test_lean_step_one_graph_for_every_method():
    """bench e2e --compile: the whole forward compiled (fullgraph) around our opaque op;
    the methods share one graph and give the eager step's logits."""
    from torch._dynamo.utils import counters

    from nucleus_attn.bench.e2e import TINY, DecodeLoop, build_model, compile_model

    model = build_model(dict(TINY, num_hidden_layers=2), torch.float32, torch.device("cpu"), 0)
    loop = DecodeLoop(model, 2, 64, 8, 0)
    forward = compile_model(model)
    graphs = None
    for method, params in (("quest", {"budget": 16}), ("twilight", {"p": 0.8})):
        eager, compiled = [], []
        for fwd, out in ((None, eager), (forward, compiled)):
            loop.reset()
            loop.forward = fwd
            with na.enable(model, method, dense_layers=1, **params):
                out += [loop.step().clone() for _ in range(3)]
        for e, c in zip(eager, compiled, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # twilight reused quest's graph


# --- the long run --------------------------------------------------------------------------

def test_long_run_reports_per_token_time(tmp_path):
    assert cli.main(["bench", "memory", "--quick", "--out", str(tmp_path),
                     "--methods", "streaming:sink=4,window=16", "--steps", "24"]) == 0
    (run,) = json.loads((tmp_path / "bench_memory_cpu.json").read_text())["runs"]
    assert len(run["step_seconds"]) == 23 and all(s > 0 for s in run["step_seconds"])
    t = run["time"]
    assert len(t["window_ms"]) >= 10 and t["flatness"] > 0
    assert t["growth_ms_per_1k"] is not None and t["intercept_ms"] is not None


def test_time_profile_fits_a_line():
    from nucleus_attn.bench.memory import time_profile

    steps = [1e-3 * (2.0 + 0.5 * (100 + i) / 1000) for i in range(400)]  # 0.5 ms per 1k
    t = time_profile(steps, prompt_tokens=99)
    assert t["growth_ms_per_1k"] == pytest.approx(0.5, rel=1e-6)
    assert t["intercept_ms"] == pytest.approx(2.0, rel=1e-6)
    assert t["flatness"] == pytest.approx(1.0, rel=1e-3)
    spiky = steps[:300] + [s * 2 for s in steps[300:320]] + steps[320:]
    assert time_profile(spiky, prompt_tokens=99)["flatness"] > 1.5


def test_crop_static_cache_without_crop(llama, monkeypatch):
    """bench generate continues every run from one prefilled cache, cropped back after each
    run; transformers before 5.24 has no crop for static layers (the GPU image's 5.17):
    then the tail is cleared and each layer's length set, as crop does."""
    from nucleus_attn.bench.generate import crop, prefill_cache

    ids = prompt(30, 5)
    cache, _ = prefill_cache(llama, ids, 48)
    assert int(cache.get_seq_length()) == 30

    def no_crop(*args):
        raise AttributeError("'StaticLayer' object has no attribute 'crop'")

    monkeypatch.setattr(type(cache), "crop", no_crop)
    crop(cache, 20)
    assert int(cache.get_seq_length()) == 20
    assert not cache.layers[0].keys[:, :, 20:].any()
