"""Twilight's candidate bases (quest, cluster, dense): each against a torch reference written
here from the definitions, the range path against the index-list path, planted heavy keys,
and the invariants every method keeps (ragged batches, static caches, padded batches)."""

from __future__ import annotations

import math

import pytest
import torch
from method_cases import variant_cases
from ops_helpers import interpreter  # noqa: F401  (fixture)

import nucleus_attn as na
from nucleus_attn import ops
from nucleus_attn.methods.twilight import TwilightConfig, cluster_candidates, new_state, select

VARIANTS = variant_cases()
BASES = ("quest", "cluster", "dense")


def rand(b, hq, hkv, n, d, seed=0, qscale=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g) * qscale
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q, k, v


def as_sets(idx: torch.Tensor, cnt: torch.Tensor) -> list[list[set[int]]]:
    return [[set(idx[b, h, :cnt[b, h]].tolist()) for h in range(idx.shape[1])]
            for b in range(idx.shape[0])]


def no_duplicates(idx: torch.Tensor, cnt: torch.Tensor) -> bool:
    return all(len(set(idx[b, h, :cnt[b, h]].tolist())) == int(cnt[b, h])
               for b in range(idx.shape[0]) for h in range(idx.shape[1]))


# --- the reference: Twilight from its definition, one (sequence, KV head) at a time ---------

def fixed_positions(span, b: int, sink: int, window: int, since: int | None = None) -> set[int]:
    """Sink, window and (with ``since``) every position from ``since`` on, of sequence b."""
    lo, hi = int(span.starts[b]), int(span.ends[b])
    out = set(range(lo, min(lo + sink, hi))) | set(range(max(lo, hi - window), hi))
    if since is not None:
        out |= set(range(max(lo, since), hi))
    return out


def cluster_reference(q, state, span, budget, sink, window, scale) -> list[list[set[int]]]:
    """Candidates of the cluster base from the labels (not the CSR members lists)."""
    cl = state.clusters
    b, hq, _ = q.shape
    hkv = cl.sizes.shape[1]
    g = hq // hkv
    out = []
    for i in range(b):
        fixed = fixed_positions(span, i, sink, window, int(cl.ends[i]))
        row = []
        for h in range(hkv):
            cents = cl.centroids[i, h].double()
            alive = cl.sizes[i, h] > 0
            s = scale * (q[i, h * g:(h + 1) * g].double() @ cents.T)  # [g, C]
            s = torch.where(alive, s, torch.full_like(s, float("-inf")))
            agg = (s - torch.logsumexp(s, -1, keepdim=True)).amax(0)
            order = sorted(range(agg.shape[0]), key=lambda c: -float(agg[c]))
            labels = cl.labels[i, h, :span.n]
            cand, acc = set(fixed), 0  # acc: tokens the clusters added
            for c in order:
                if acc >= budget - len(fixed):
                    break
                members = set(torch.nonzero(labels == c).flatten().tolist())
                cand |= members
                acc += len(members - fixed)
            row.append(cand)
        out.append(row)
    return out


def est_weights(q, state, span, cand: set[int], i: int, h: int, g: int, scale) -> tuple:
    """Positions and float64 softmax weights of each query head of (i, h) over the
    candidates, from the int4 estimates as the reference estimator gives them."""
    pos = sorted(cand)
    keys = state.keys
    idx = torch.tensor(pos, dtype=torch.int64).view(1, 1, -1)
    cnt = torch.tensor([[len(pos)]])
    est = ops.int4_scores(q[i:i + 1, h * g:(h + 1) * g], keys.codes[i:i + 1, h:h + 1],
                          keys.scale[i:i + 1, h:h + 1], keys.zero[i:i + 1, h:h + 1], idx, cnt,
                          scale, impl="torch")[0]  # [g, M]
    return pos, torch.softmax(est.double(), -1)


def exact_nucleus(w: torch.Tensor, p: float) -> set:
    """Sort-based nucleus of one row of weights (indices; ties at the threshold kept)."""
    vals, order = torch.sort(w, descending=True)
    cut = int((torch.cumsum(vals, 0) < p * (1 - 1e-12)).sum())
    thr = vals[min(cut, len(vals) - 1)]
    return set(torch.nonzero(w >= thr).flatten().tolist())


def twilight_reference(q, state, span, cands, p, sink, window, scale):
    """Per (sequence, KV head): the union of the exact nuclei over the estimated weights of
    the candidates plus the sink and window, and each query head's (positions, weights)."""
    b, hq, _ = q.shape
    hkv = len(cands[0])
    g = hq // hkv
    union, weights = [], []
    for i in range(b):
        fixed = fixed_positions(span, i, sink, window)
        urow, wrow = [], []
        for h in range(hkv):
            pos, w = est_weights(q, state, span, cands[i][h], i, h, g, scale)
            keep = set(fixed & cands[i][h])
            for j in range(g):
                keep |= {pos[x] for x in exact_nucleus(w[j], p)}
            urow.append(keep)
            wrow.append((pos, w))
        union.append(urow)
        weights.append(wrow)
    return union, weights


def assert_contract(got, want, p: float) -> None:
    """The top-p contract per (sequence, KV head): the kept set lies in the candidates,
    holds at least p of each query head's estimated mass, and has at most 2% more tokens
    than the union of the exact nuclei (with the sink and window) plus 16."""
    union, weights = want
    for i, row in enumerate(got):
        for h, kept in enumerate(row):
            pos, w = weights[i][h]
            assert kept <= set(pos), (i, h, "kept a position that is not a candidate")
            inside = torch.tensor([x in kept for x in pos])
            mass = (w * inside).sum(-1)
            assert (mass >= p * (1 - 1e-5)).all(), (i, h, mass.min().item())
            assert len(kept) <= 1.02 * len(union[i][h]) + 16, (i, h, len(kept),
                                                                  len(union[i][h]))


SPANS = {  # name -> (starts, ends) for B=3 sequences of N positions
    "full": lambda n: ([0, 0, 0], [n, n, n]),
    "left": lambda n: ([0, 13, n // 2], [n, n, n]),
    "ragged": lambda n: ([0, 0, 0], [n, n - 7, n // 3 + 1]),
    "static": lambda n: ([5, 0, 31], [n - 3, n // 2, n]),  # left padding and unwritten tail
}


def make_span(kind: str, n: int) -> na.KeySpan:
    s, e = SPANS[kind](n)
    return na.KeySpan(torch.tensor(s), torch.tensor(e), n)


# --- the cluster base ---------------------------------------------------------------------

@pytest.mark.parametrize("span_kind", list(SPANS))
@pytest.mark.parametrize(("hq", "hkv", "n"), [(3, 1, 97), (8, 2, 531), (4, 4, 300)])
def test_cluster_candidates_match_reference(span_kind, hq, hkv, n):
    q, k, _ = rand(3, hq, hkv, n, 64, seed=n + hq)
    span = make_span(span_kind, n)
    cfg = TwilightConfig(base="cluster", cluster_size=8, iterations=4, segment=128)
    state = new_state(k, span, cfg)
    for budget in (1, 40, n // 3, n):
        idx, cnt = cluster_candidates(q, state.clusters, span, n, budget, 4, 16, 0.125)
        assert no_duplicates(idx, cnt)
        want = cluster_reference(q, state, span, budget, 4, 16, 0.125)
        assert as_sets(idx, cnt) == want, budget
        # the budget is met, overshot by less than one cluster
        valid = span.lengths[:, None]
        assert (cnt <= torch.minimum(valid, torch.tensor(budget + state.clusters.max_size))).all()
        assert (cnt >= torch.minimum(valid, torch.tensor(budget))).all()


def test_cluster_candidates_include_tokens_appended_after_clustering():
    q, k, _ = rand(2, 8, 2, 300, 64, seed=3)
    cfg = TwilightConfig(base="cluster", cluster_size=8, iterations=3, window=4)
    span0 = na.KeySpan(torch.tensor([0, 20]), torch.tensor([260, 260]), 260)
    state = new_state(k[:, :, :260], span0, cfg)
    for n in range(261, 301):  # 40 decode tokens appended one by one
        state.extend(k[:, :, :n], span0.with_length(n))
    span = span0.with_length(300)
    assert state.clusters.clustered == 260
    idx, cnt = cluster_candidates(q, state.clusters, span, 300, 64, cfg.sink, cfg.window, 0.125)
    got = as_sets(idx, cnt)
    assert all(set(range(260, 300)) <= got[i][h] for i in range(2) for h in range(2))
    assert got == cluster_reference(q, state, span, 64, cfg.sink, cfg.window, 0.125)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("span_kind", ["left", "static"])
def test_cluster_base_selection_matches_reference(p, span_kind):
    n = 400
    q, k, _ = rand(3, 8, 2, n, 64, seed=int(p * 100))
    span = make_span(span_kind, n)
    cfg = TwilightConfig(base="cluster", p=p, base_budget=120, cluster_size=8, iterations=4)
    state = new_state(k, span, cfg)
    sel = select(q, k, state, span, cfg, 0.125)
    cands = cluster_reference(q, state, span, 120, cfg.sink, cfg.window, 0.125)
    assert sel.candidates.tolist() == [[len(c) for c in row] for row in cands]
    want = twilight_reference(q, state, span, cands, p, cfg.sink, cfg.window, 0.125)
    assert no_duplicates(sel.indices, sel.counts)
    assert_contract(as_sets(sel.indices, sel.counts), want, p)


# --- base="dense": the range path against the index-list path --------------------------------

def index_list_path(q, k, state, span, cfg, scale):
    """Twilight over every valid position written with the index-list ops."""
    b, hkv, n = k.shape[0], k.shape[1], k.shape[2]
    cand, cnt = ops.mask_to_indices(span.valid_mask())
    cand = cand[:, None, :].expand(b, hkv, n).contiguous()
    cnt = cnt[:, None].expand(b, hkv).contiguous()
    keys = state.keys
    est = ops.int4_scores(q, keys.codes, keys.scale, keys.zero, cand, cnt, scale)
    return ops.topp_select(est, cand, cnt, cfg.p, span=span, sink=cfg.sink, window=cfg.window)


def dense_reference(q, state, span, p, sink, window, scale):
    b = q.shape[0]
    hkv = state.keys.codes.shape[1]
    cands = [[set(range(int(span.starts[i]), int(span.ends[i]))) for _ in range(hkv)]
             for i in range(b)]
    return twilight_reference(q, state, span, cands, p, sink, window, scale)


RANGE_SHAPES = [  # B, Hq, Hkv, N, d, span kind
    (1, 4, 4, 1, 64, None),
    (3, 3, 1, 17, 64, "left"),
    (3, 8, 2, 1000, 128, "ragged"),
    (3, 8, 1, 4099, 64, "static"),
    (3, 24, 3, 531, 64, "left"),
]


@pytest.mark.parametrize("p", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("shape", RANGE_SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}/{s[2]}N{s[3]}"
                         f"d{s[4]}{s[5] or ''}")
def test_dense_base_range_path_equals_index_list_path(shape, p):
    b, hq, hkv, n, d, kind = shape
    q, k, _ = rand(b, hq, hkv, n, d, seed=n + int(p * 10))
    span = make_span(kind, n) if kind else na.KeySpan.full(b, n)
    cfg = TwilightConfig(base="dense", p=p)
    state = new_state(k, span, cfg)
    sel = select(q, k, state, span, cfg, 1 / math.sqrt(d))
    assert torch.equal(sel.candidates, span.lengths[:, None].expand(b, hkv))
    idx, cnt = index_list_path(q, k, state, span, cfg, 1 / math.sqrt(d))
    # both paths meet the contract, and keep the same tokens (the same rule over the same
    # estimates: the index list holds the valid positions in order)
    want = dense_reference(q, state, span, p, cfg.sink, cfg.window, 1 / math.sqrt(d))
    got = as_sets(sel.indices, sel.counts)
    assert_contract(got, want, p)
    assert_contract(as_sets(idx, cnt), want, p)
    if span.starts.eq(0).all():  # (left padding moves the chunks the Z' bound is made of)
        assert got == as_sets(idx, cnt)
    assert no_duplicates(sel.indices, sel.counts)


@pytest.mark.parametrize("shape", [(3, 8, 2, 300, 64, "static"), (3, 3, 1, 97, 128, "left")])
def test_dense_base_range_path_in_the_interpreter(interpreter, monkeypatch, shape):  # noqa: F811
    """The Triton path of every op Twilight's range mode calls (``NUCLEUS_ATTN_BACKEND``
    forces it through ``impl="auto"``) gives the kept sets of the torch path."""
    b, hq, hkv, n, d, kind = shape
    q, k, _ = rand(b, hq, hkv, n, d, seed=5)
    span = make_span(kind, n)
    cfg = TwilightConfig(base="dense", p=0.9)
    state = new_state(k, span, cfg)
    ref = select(q, k, state, span, cfg, 1 / math.sqrt(d))
    want = dense_reference(q, state, span, 0.9, cfg.sink, cfg.window, 1 / math.sqrt(d))
    monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", "triton")
    got = select(q, k, state, span, cfg, 1 / math.sqrt(d))
    assert_contract(as_sets(got.indices, got.counts), want, 0.9)
    assert_contract(as_sets(ref.indices, ref.counts), want, 0.9)


def test_cluster_base_in_the_interpreter(interpreter, monkeypatch):  # noqa: F811
    q, k, _ = rand(3, 8, 2, 200, 64, seed=8)
    span = make_span("static", 200)
    cfg = TwilightConfig(base="cluster", p=0.9, base_budget=64, cluster_size=8, iterations=3)
    state = new_state(k, span, cfg)
    ref = select(q, k, state, span, cfg, 0.125)
    monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", "triton")
    got = select(q, k, state, span, cfg, 0.125)
    assert torch.equal(got.candidates, ref.candidates)
    cands = cluster_reference(q, state, span, 64, cfg.sink, cfg.window, 0.125)
    want = twilight_reference(q, state, span, cands, 0.9, cfg.sink, cfg.window, 0.125)
    assert_contract(as_sets(got.indices, got.counts), want, 0.9)


# --- planted heavy keys among isotropic keys --------------------------------------------------

def planted(b, hq, hkv, n, d, count=5, logit=12.0, seed=0):
    """Isotropic N(0, 1) queries and keys; per KV head ``count`` keys planted at random
    positions, each aligned with one random query head of the group and scaled so that its
    logit for that head is ``logit`` (its norm is then ~``logit``: no larger than the
    others', so neither a norm nor a per-channel range gives it away)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(b, hq, hkv, n, d, seed=seed, qscale=1.0)
    grp = hq // hkv
    pos = torch.stack([torch.randperm(n - 128, generator=g)[:count] + 64
                       for _ in range(b * hkv)]).view(b, hkv, count)
    who = torch.randint(0, grp, (b, hkv, count), generator=g)
    qk = q.view(b, hkv, grp, d).gather(2, who[..., None].expand(-1, -1, -1, d))
    heavy = qk * (logit * math.sqrt(d) / (qk * qk).sum(-1, keepdim=True))
    k.scatter_(2, pos[..., None].expand(-1, -1, -1, d), heavy)
    return q, k, v, pos


def planted_kept(params: dict, d: int, seeds=(0, 1)) -> float:
    share = []
    for seed in seeds:
        q, k, v, pos = planted(2, 8, 2, 2048, d, seed=seed)
        _, info = na.sparse_decode(q, k, v, "twilight", p=0.95, **params)
        share.append(info.kept_mask(2048).gather(-1, pos).float().mean().item())
    return sum(share) / len(share)


@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("params", [{"base": "dense"}, {"base": "quest", "page_size": 4}],
                         ids=["dense", "quest-pages-of-4"])
def test_planted_heavy_keys_are_kept(params, d):
    assert planted_kept(params, d) == 1.0


@pytest.mark.parametrize("d", [128, 256])
def test_planted_heavy_keys_cluster_base_measured(d):
    """Measured: the cluster base keeps most planted keys but not all at d=256 (0.83 of them
    over seeds 0-3 at N=2048, 0.70-0.95 per seed; 0.99 at d=128). K-means on isotropic keys
    makes a few very large clusters (hundreds of members; the median has 4-5) near the
    origin, and a planted key of norm ~12 (the others have ~16 at d=256) falls into one of
    them: the centroid averages its logit away. Twilight's base="dense" has no such
    failure."""
    kept = planted_kept({"base": "cluster"}, d)
    assert kept >= (0.95 if d == 128 else 0.75), kept


@pytest.mark.parametrize("d", [128, 256])
def test_planted_heavy_keys_quest_base_measured_miss(d):
    """Measured miss, the reason Twilight's default base is not Quest's pages of 16: the page
    bound sum_c max(q_c min_c, q_c max_c) over 16 isotropic keys is dominated by the
    per-channel extremes of the page, which one aligned key of ordinary norm barely moves; at
    d=256 (where its norm is below the others') most planted keys fall outside a 25% page
    budget (0.18 kept over seeds 0-3 at N=2048; 0.86 at d=128; pages of 8: 0.59 at d=256).
    Pages of 4 keep them all (above), at 2 d / 4 bound values a token: more bytes than the
    4-bit keys of every token that base="dense" reads."""
    kept = planted_kept({"base": "quest"}, d)
    if d == 256:
        assert kept <= 0.6, kept
    else:
        assert 0.5 <= kept < 1.0, kept


# --- invariants of every base ---------------------------------------------------------------

@pytest.mark.parametrize("name,params", VARIANTS, ids=lambda x: str(x))
def test_variant_is_attention_over_its_kept_set_and_full_is_dense(name, params):
    q, k, v = rand(2, 8, 2, 700, 64, seed=2)
    lengths = torch.tensor([700, 311])
    out, info = na.sparse_decode(q, k, v, name, lengths=lengths, diagnostics=True, **params)
    mask = info.kept_mask(700)
    assert not mask[1, :, 311:].any() and (info.kept <= info.candidates).all()
    s = torch.einsum("bhgd,bhnd->bhgn", q.view(2, 2, 4, 64).double(), k.double()) / 8.0
    s = s.masked_fill(~mask[:, :, None], float("-inf"))
    ref = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), v.double()).reshape(2, 8, 64)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    full, info = na.sparse_decode(q, k, v, name, lengths=lengths, **{**params, "p": 1.0})
    dense, _ = na.sparse_decode(q, k, v, "dense", lengths=lengths)
    assert (full - dense).abs().max().item() <= 1e-5
    assert torch.equal(info.kept, lengths[:, None].expand(2, 2))


@pytest.mark.parametrize("name,params", VARIANTS, ids=lambda x: str(x))
def test_variant_ragged_batch_equals_each_sequence_alone(name, params):
    params = {**params, "base_budget": 96}  # a fraction would be of the padded N
    q, k, v = rand(3, 8, 2, 500, 64, seed=11)
    lengths = torch.tensor([500, 123, 351])
    out, info = na.sparse_decode(q, k, v, name, lengths=lengths, **params)
    for b, n in enumerate(lengths.tolist()):
        o1, i1 = na.sparse_decode(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], name,
                                  **params)
        torch.testing.assert_close(out[b:b + 1], o1, atol=1e-5, rtol=1e-5)
        assert torch.equal(info.kept[b], i1.kept[0])


@pytest.mark.parametrize("base", BASES)
def test_state_extend_matches_fresh_build(base):
    """Metadata extended token by token selects what a fresh build selects (the cluster
    base re-clusters after ``recluster_every`` appended tokens, so it is checked below it)."""
    cfg = TwilightConfig(base=base, p=0.8, base_budget=160, cluster_size=8, iterations=3)
    q, k, v = rand(2, 8, 2, 530, 64, seed=4)
    state = new_state(k[:, :, :500], na.KeySpan.full(2, 500), cfg)
    for n in (501, 517, 530):
        state.extend(k[:, :, :n], na.KeySpan.full(2, n))
    span = na.KeySpan.full(2, 530)
    _, i1 = na.decode_step(q, k, v, cfg, state, span, 0.125)
    if base != "cluster":
        _, i2 = na.decode_step(q, k, v, cfg, new_state(k, span, cfg), span, 0.125)
        assert torch.equal(i1.kept, i2.kept)
        return
    assert state.clusters.clustered == 500  # the 30 new tokens are candidates by position
    assert i1.kept_mask(530)[:, :, 500:].sum() > 0
    recl = cfg.replace(recluster_every=20)
    state = new_state(k[:, :, :500], na.KeySpan.full(2, 500), recl)
    state.extend(k, span)  # 30 >= 20 appended: clustered again over all 530
    assert state.clusters.clustered == 530


def test_config_validation():
    with pytest.raises(ValueError, match="base='pages' is not one of"):
        TwilightConfig(base="pages")
    for field in ("cluster_size", "iterations", "recluster_every"):
        with pytest.raises(ValueError, match=f"twilight: {field}=0 must be an int >= 1"):
            TwilightConfig(base="cluster", **{field: 0})
    with pytest.raises(ValueError, match="segment=8 must be an int >= 16"):
        TwilightConfig(base="cluster", segment=8)
    assert na.parse_method("twilight:base=cluster,cluster_size=8").cluster_size == 8


# --- through a model: static caches and padded batches -----------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    yield transformers.LlamaForCausalLM(config).eval()
    torch.set_num_threads(threads)


def generate(model, ids, mask, new, **kw):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def left_pad(rows):
    n = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.shape[1]:] = r[0]
        mask[i, n - r.shape[1]:] = 1
    return ids, mask


HF_VARIANTS = [  # token budgets: a fraction would be of the padded (or static) N
    {"base": "dense", "p": 0.7, "sink": 2, "window": 4},
    {"base": "cluster", "p": 0.7, "base_budget": 24, "cluster_size": 4, "iterations": 3,
     "sink": 2, "window": 4},
    {"base": "quest", "p": 0.7, "base_budget": 24, "page_size": 4, "sink": 2, "window": 4},
]


@pytest.mark.parametrize("params", HF_VARIANTS, ids=lambda p: p["base"])
def test_static_cache_equals_dynamic_cache_and_padded_batch_equals_alone(llama, params):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 256, (1, n), generator=g) for n in (40, 24)]
    ids, mask = left_pad(rows)  # padding 16: whole pages of 4
    with na.enable(llama, "twilight", dense_layers=1, **params) as handle:
        dynamic = generate(llama, ids, mask, 20)
        static = generate(llama, ids, mask, 20, cache_implementation="static")
        alone = [generate(llama, r, torch.ones_like(r), 20) for r in rows]
    assert torch.equal(static, dynamic)
    for i, (row, single) in enumerate(zip(rows, alone, strict=True)):
        assert torch.equal(dynamic[i, ids.shape[1] - row.shape[1]:], single[0]), i
    assert handle.summary()["sparse_kept_fraction"] < 1.0
