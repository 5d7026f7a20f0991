"""Memory of the methods' metadata: live states against the analytic account, and no growth
per decode step beyond the cache (tiny random-weight Llama)."""

from __future__ import annotations

import math

import pytest
import torch
from method_cases import METHOD_CASES, variant_cases

import nucleus_attn as na
from nucleus_attn.memory import (
    KV_CACHE,
    bytes_per_token,
    handle_state_bytes,
    memory_table,
    metadata_per_token,
    state_bytes,
    tensor_bytes,
)
from nucleus_attn.methods import get_spec

ALL = na.methods()
STATEFUL = ("quest", "twilight", "tactic")

# A state may keep a few [B] tensors besides its per-token and per-page/cluster buffers
# (Tactic keeps each sequence's span end at clustering): allowed per sequence and layer.
PER_SEQUENCE = 64


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rounding(cfg, n: int, d: int, isz: int) -> float:
    """Bytes per (sequence, KV head) a freshly built state holds beyond the account."""
    if cfg.name == "quest" or (cfg.name == "twilight" and cfg.base == "quest"):
        # ceil(N / page_size) pages: the last page is whole, < one page of bounds extra
        return 2 * d * isz
    if cfg.name == "tactic" or (cfg.name == "twilight" and cfg.base == "cluster"):
        # kmeans allocates ceil(segment / cluster_size) clusters for every segment, the
        # last (partial) one included, and rounds each segment's count up: C - N / size
        # is below one segment's clusters plus one per segment, plus one for the rounded
        # up outlier slots. Each cluster costs a centroid (keys' dtype), a size and an
        # offset (int64) and a spread (float32).
        per_seg = math.ceil(cfg.segment / cfg.cluster_size)
        return (per_seg + math.ceil(n / cfg.segment) + 1) * (d * isz + 20)
    return 0.0


def accounted(cfg, n: int, b: int, h: int, d: int, dtype: torch.dtype) -> float:
    return metadata_per_token(bytes_per_token(cfg, head_dim=d, dtype=dtype, kv_heads=h)) * n * b


def keys(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g).to(dtype)


# --- the account ------------------------------------------------------------------------------

def test_account_covers_registry_and_kv_cache():
    for name in ALL:
        items = bytes_per_token(name, head_dim=128, dtype=torch.bfloat16, kv_heads=8)
        assert items[KV_CACHE] == 2 * 128 * 2 * 8
        stateless = get_spec(name).new_state is None
        assert (metadata_per_token(items) == 0) == stateless, name
    assert {n for n in ALL if get_spec(n).new_state is not None} == set(STATEFUL)
    tw = bytes_per_token(na.Twilight(base="quest"), head_dim=128, dtype=torch.bfloat16)
    assert tw == {"int4_codes": 64, "int4_scale": 2, "int4_zero": 2, "page_min_max": 32,
                  KV_CACHE: 512}
    assert bytes_per_token("twilight", head_dim=64, dtype="float32") == {  # base="dense"
        "int4_codes": 32, "int4_scale": 4, "int4_zero": 4, KV_CACHE: 512}
    cl = bytes_per_token(na.Twilight(base="cluster"), head_dim=128, dtype=torch.bfloat16)
    per = 1 / 16 + na.Tactic().outliers  # K-means clusters and outlier singletons a token
    assert "page_min_max" not in cl and cl["centroids"] == pytest.approx(128 * 2 * per)
    # int4 keys; per cluster its centroid, size, offset (int64) and spread (float32); ids
    assert metadata_per_token(cl) == pytest.approx(68 + (256 + 8 + 8 + 4) * per + 12)


def test_memory_table_totals():
    rows = memory_table(["dense", "quest", na.Tactic(cluster_size=8)], head_dim=64,
                        dtype=torch.float16, kv_heads=2, layers=3, tokens=1000)
    assert [r["method"].split(":")[0] for r in rows] == ["dense", "quest", "tactic"]
    for r in rows:
        assert r["bytes_per_token_layer"] == pytest.approx(sum(r["items"].values()))
        assert r["metadata_bytes"] == pytest.approx(r["bytes_per_token_layer"] * 3 * 1000)
        assert r["kv_cache_bytes"] == 2 * 64 * 2 * 2 * 3 * 1000
        assert r["ratio"] == pytest.approx(r["bytes_per_token_layer"] / (2 * 64 * 2 * 2))
    assert rows[0]["metadata_bytes"] == 0


def test_tensor_bytes_counts_each_storage_once():
    base = torch.zeros(10, 8)
    obj = {"a": base[:2], "b": [base, base.T], "c": (torch.zeros(3, dtype=torch.int64), None)}
    assert tensor_bytes(obj) == 10 * 8 * 4 + 3 * 8
    assert tensor_bytes(obj, exclude=[obj["b"]]) == 10 * 8 * 4 + 3 * 8  # a view keeps base
    assert state_bytes(None) == 0


# --- freshly built states ---------------------------------------------------------------------

SHAPES = [  # B, Hkv, N, d, dtype, left padding of row 0
    (2, 2, 203, 64, torch.float32, 0),
    (1, 8, 1000, 128, torch.bfloat16, 0),
    (3, 1, 77, 64, torch.bfloat16, 13),
    (2, 4, 331, 128, torch.float32, 5),
]


def method_settings():
    for name in ALL:
        for case in ("easy", "hard"):
            yield name, METHOD_CASES[name][case]
    yield from variant_cases()  # every Twilight base
    yield "tactic", {"cluster_size": 6, "segment": 60, "iterations": 2}  # several segments


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}N{s[2]}d{s[3]}")
@pytest.mark.parametrize("name,params", list(method_settings()))
def test_new_state_matches_account(name, params, shape):
    b, h, n, d, dtype, pad = shape
    cfg = na.make_config(name, **params)
    k = keys(b, h, n, d, dtype)
    starts = torch.zeros(b, dtype=torch.int64)
    starts[0] = pad
    span = na.KeySpan(starts, torch.full((b,), n), n)
    got = state_bytes(na.new_state(cfg, k, span))
    want = accounted(cfg, n, b, h, d, dtype)
    slack = b * h * rounding(cfg, n, d, itemsize(dtype)) + b * PER_SEQUENCE * (want > 0)
    assert want <= got <= want + slack, (name, params, shape, got, want)


@pytest.mark.parametrize("name,params", [(n, {}) for n in STATEFUL] + [
    ("twilight", {"base": "quest"}), ("twilight", {"base": "cluster"})])
def test_extend_stays_within_doubling(name, params):
    """Token-by-token appends: the buffers grow by doubling, so they hold at most twice the
    bytes of the tokens covered (plus the rounding of a fresh state)."""
    b, h, n0, n, d, dtype = 2, 2, 37, 150, 64, torch.bfloat16
    cfg = na.make_config(name, **params)
    clustered = name == "tactic" or getattr(cfg, "base", "") == "cluster"
    if clustered:
        cfg = cfg.replace(recluster_every=50)
    k = keys(b, h, n, d, dtype)
    state = na.new_state(cfg, k[:, :, :n0], na.KeySpan.full(b, n0))
    for m in range(n0 + 1, n + 1):
        state.extend(k[:, :, :m], na.KeySpan.full(b, m))
    got = state_bytes(state)
    want = accounted(cfg, n, b, h, d, dtype)
    slack = b * h * rounding(cfg, n, d, itemsize(dtype)) + b * PER_SEQUENCE
    # Tactic re-clusters every 50 appended tokens; in between, appended tokens have labels
    # but no place in the clusters, hence the lower bound over the clustered tokens only
    low = accounted(cfg, n - 49, b, h, d, dtype) if clustered else want
    assert low <= got <= 2 * (want + slack), (name, got, want)


# --- generation through a model --------------------------------------------------------------

transformers = pytest.importorskip("transformers")

D, HKV, LAYERS, DENSE_LAYERS, PROMPT = 32, 2, 3, 1, 37
SHORT_LONG = (24, 200)  # new tokens of the two generations compared
# settings whose metadata is large relative to a 37-token prompt: small pages and
# clusters, and Tactic re-clustering (its states are rebuilt) during the run
GEN_CASES = {
    "quest": {"budget": 16, "page_size": 8},
    "twilight": {"p": 0.7, "base": "quest", "base_budget": 24, "page_size": 8},
    "tactic": {"p": 0.7, "cluster_size": 4, "segment": 64, "iterations": 2,
               "recluster_every": 128},
}


@pytest.fixture(scope="module")
def llama():
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=HKV, head_dim=D,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def generate(model, ids, mask, new):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", ALL)
def test_generation_memory_is_bounded_and_does_not_grow(llama, name):
    cfg = na.make_config(name, **GEN_CASES.get(name, {}))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, PROMPT), generator=g)
    plain = torch.ones_like(ids)
    padded = plain.clone()
    padded[1, :9] = 0  # row 1 left-padded
    sparse = LAYERS - DENSE_LAYERS
    other = {}
    with na.enable(llama, cfg, dense_layers=DENSE_LAYERS) as handle:
        for mask_name, mask in (("plain", plain), ("padded", padded)):
            for new in SHORT_LONG:
                generate(llama, ids, mask, new)
                n = PROMPT + new - 1  # cached positions: the last token is never written
                states = [layer.state for layer in handle._layers.values()]
                got = handle_state_bytes(handle)
                want = accounted(cfg, n, 2, HKV, D, torch.float32) * sparse
                slack = sparse * (2 * HKV * rounding(cfg, n, D, 4) + 2 * PER_SEQUENCE)
                # the state is built at the first decode step (PROMPT + 1 positions) and
                # extended; Tactic's clusters hold the tokens up to its last re-clustering
                low = accounted(cfg, PROMPT + 1, 2, HKV, D, torch.float32) * sparse
                assert low <= got <= 2 * (want + slack), (name, new, got, want)
                if name in ("quest", "twilight"):
                    assert got >= want
                # everything else the handle holds (statistics, the current key span)
                other[mask_name, new] = (tensor_bytes(handle, exclude=states), n)
    assert other["plain", SHORT_LONG[0]][0] == other["plain", SHORT_LONG[1]][0]
    # a padded batch's handle keeps the last step's decode mask ([B, 1, 1, N] bool) to
    # tell the steps apart, until the next decode step (of this or a later generation):
    # replaced at every step, so it is one mask, never more
    (short, n_short), (long, n_long) = (other["padded", new] for new in SHORT_LONG)
    assert long - short <= 2 * (n_long - n_short)


def test_measure_growth_on_cpu(llama):
    from nucleus_attn.bench.memory import measure_growth

    out = measure_growth(llama, "quest", prompt_tokens=20, new_tokens=30, device="cpu",
                         dense_layers=DENSE_LAYERS, progress=False, page_size=8, budget=8)
    n = 20 + 30 - 1
    assert out["cached_tokens"] == n and out["sparse_layers"] == LAYERS - DENSE_LAYERS
    assert out["kv_cache_bytes"] == out["kv_cache_accounted"] == 2 * LAYERS * HKV * n * D * 4
    acc = out["accounting"]["metadata_bytes"]
    assert acc <= out["state_bytes"] <= 2 * (acc + 2 * D * 4 * HKV * out["sparse_layers"])
    assert out["samples"] is None and out["max_memory_allocated"] is None
