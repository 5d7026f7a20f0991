"""Tactic's selection (four ops working on score bins, cluster log-masses and member lists)
against the token-level definition it implements, written here in float64 from the
method's description; and the state's life cycle (appended tokens, static caches,
re-clustering in place)."""

from __future__ import annotations

import math

import pytest
import torch

import nucleus_attn as na
from nucleus_attn import ops
from nucleus_attn.decode import new_state
from nucleus_attn.methods import tactic
from nucleus_attn.ops import tactic_select as ts
from nucleus_attn.span import KeySpan
from nucleus_attn.synthetic import peaked_qkv


def tactic_token_level(q, k, state, span, cfg, scale):
    """Every quantity per token in float64: the kept mask ``[B, Hkv, N]``."""
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qd, kd = q.double(), k.double()
    labels = state.labels[:, :, :n]
    lab = labels.clamp(min=0)
    # 1. cluster scores with the spread term, the group's best log-softmax, bins
    cs = torch.einsum("bhgd,bhcd->bhgc", qd.view(b, hkv, g, d), state.centroids.double()) * scale
    if cfg.spread_rank:
        qn2 = (qd * qd).sum(-1).view(b, hkv, g, 1)
        cs = cs + 0.5 * scale**2 * qn2 * state.spread.double()[:, :, None, :]
    cs = cs.masked_fill((state.sizes == 0)[:, :, None, :], float("-inf"))
    agg = (cs - torch.logsumexp(cs, -1, keepdim=True)).amax(2)
    cbin = torch.floor(-agg * ts.BINS_PER_NAT).clamp(0, ts.RANK_BINS - 1).long()
    tbin = torch.where(labels >= 0, cbin.gather(-1, lab), ts.RANK_BINS)  # [B, Hkv, N]
    # 2. rank ranges of the bins over the clustered tokens; the head and the segments
    clustered = labels >= 0
    j = torch.arange(ts.RANK_BINS + 1)
    starts = (clustered[..., None, :] & (tbin[..., None, :] < j[:, None])).sum(-1)  # [B,Hkv,NB+1]
    total = starts[..., -1:].double()
    ht = torch.ceil(cfg.exact_fraction * total).clamp(min=1)
    hb = (starts[..., :-1] < ht).sum(-1, keepdim=True)
    segs = []
    for frac in cfg.sample_positions:
        x0 = torch.floor(frac * total)
        lo = (starts[..., 1:] <= x0).sum(-1, keepdim=True)
        hi = (starts[..., :-1] < x0 + cfg.sample_tokens).sum(-1, keepdim=True) - 1
        segs.append((lo, hi, x0))
    # 3. exact weights; the always-kept tokens; head and segment masses
    logit = torch.einsum("bhgd,bhnd->bhgn", qd.view(b, hkv, g, d), kd) * scale
    w = torch.exp(logit - logit.amax(-1, keepdim=True))
    pos = span.positions().expand(b, n)
    valid = span.valid_mask()[:, None, :]
    fixed = valid & ((labels < 0) | span.forced(pos, cfg.sink, cfg.window)[:, None])
    ordinary = valid & clustered & ~fixed
    e_fixed = (w * fixed[:, :, None]).sum(-1)  # [B, Hkv, g]
    head_tok = ordinary & (tbin < hb)
    ys, xs = [], []
    for lo, hi, x0 in segs:
        tok = ordinary & (tbin >= lo) & (tbin <= hi)
        ys.append((w * tok[:, :, None]).sum(-1) / tok.sum(-1, keepdim=True).clamp(min=1))
        x_lo, x_hi = starts.gather(-1, lo.clamp(max=ts.RANK_BINS)), starts.gather(-1, hi + 1)
        x = torch.where(lo <= hi, (x_lo + x_hi) / 2 + 0.5, x0 + 0.5).clamp(min=1)
        xs.append(x.double().expand_as(ys[-1]))
    a, bb = ts.fit_curve(ys[0], ys[1], xs[0], xs[1])
    a, bb = a[..., None], bb[..., None]  # [B, Hkv, g, 1]

    def curve(x):  # sum_{t=1}^{x} max(a/t + b, 0), float64
        t0 = torch.where(bb < 0, a / (-bb).clamp(min=1e-300), torch.full_like(a, math.inf))
        xe = torch.minimum(x, torch.floor(t0).clamp(min=0))
        return a * (torch.special.digamma(xe + 1) + 0.5772156649015329) + bb * xe

    # 4. estimated mass of each prefix of bins; the shortest reaching p; the group's longest
    h = starts.gather(-1, hb).double()[:, :, None]  # [B, Hkv, 1, 1]
    st = starts.double()[:, :, None, :]  # [B, Hkv, 1, NB + 1]
    head_w = torch.stack([(w * (head_tok & (tbin < p))[:, :, None]).sum(-1)
                          for p in range(ts.RANK_BINS + 1)], -1)  # [B, Hkv, g, NB + 1]
    mass = e_fixed[..., None] + head_w + curve(torch.maximum(st, h)) - curve(h)
    need = (mass[..., :-1] < cfg.p * mass[..., -1:]).sum(-1)  # [B, Hkv, g]
    prefix = need.amax(-1, keepdim=True)
    return fixed | (valid & clustered & (tbin < prefix))


@pytest.mark.parametrize(("p", "n", "hq", "hkv", "ragged", "appended", "params"), [
    (0.9, 1000, 8, 2, False, 0, {}),
    (0.6, 1500, 4, 1, True, 0, {}),
    (0.99, 777, 6, 2, True, 40, {}),
    (0.9, 2000, 8, 1, False, 300, {"spread_rank": False}),
    (0.75, 300, 3, 3, False, 0, {"outliers": 0.0}),
    (0.9, 600, 8, 2, False, 0, {"diffuse": True}),
])
def test_selection_matches_token_level_definition(p, n, hq, hkv, ragged, appended, params):
    params = dict(params)
    shape = {"planted": 0, "spread": 1.0} if params.pop("diffuse", False) else {"spread": 3.0}
    x = peaked_qkv(2, hq, hkv, n, 64, seed=n, **shape)
    cfg = na.make_config("tactic", p=p, cluster_size=8, iterations=3, segment=512, **params)
    lengths = torch.tensor([n, n - n // 5]) if ragged else torch.tensor([n, n])
    span = KeySpan.from_lengths(lengths, n)
    if appended:  # tokens appended after clustering are attended exactly
        state = new_state(cfg, x.k[:, :, :n - appended], KeySpan.full(2, n - appended))
        span = KeySpan.full(2, n)
        state.extend(x.k, span)
    else:
        state = new_state(cfg, x.k, span)
    scale = 1 / math.sqrt(64)
    sel = tactic.select(x.q, x.k, state, span, cfg, scale)
    got = ops.indices_to_mask(sel.indices, sel.counts, n)
    spec = tactic_token_level(x.q, x.k, state, span, cfg, scale)
    assert torch.equal(got.sum(-1), sel.counts), "a position is listed twice"
    # equal, up to float32 rounding deciding a bin at a boundary
    diff = (got ^ spec).sum(-1)
    assert (diff <= 2 * state.max_size).all(), f"kept sets differ by {diff.tolist()} tokens"
    assert (diff == 0).float().mean() >= 0.5


def test_p_close_to_one_keeps_nearly_everything_and_p_one_is_dense():
    x = peaked_qkv(1, 4, 2, 500, 64, planted=0, spread=1.0, seed=3)
    span = KeySpan.full(1, 500)
    for p, low in ((0.999, 0.8), (1.0, 1.0)):
        cfg = na.make_config("tactic", p=p, cluster_size=8, iterations=2)
        sel = tactic.select(x.q, x.k, new_state(cfg, x.k, span), span, cfg, 0.125)
        kept = 1.0 if sel.indices is None else sel.counts.float().mean().item() / 500
        assert kept >= low


def test_unclustered_tokens_are_all_kept_without_reclustering():
    # a static cache: 200 positions, clustered up to 120; 70 tokens written since and no
    # re-clustering (what CUDA-graph replays do: they run no Python), more than
    # recluster_every = 50: the always-kept list covers the cache's 80 free positions, so
    # every written token stays attended, and no unwritten position is kept
    cfg = na.make_config("tactic", p=0.5, cluster_size=4, iterations=2, sink=2, window=8,
                         recluster_every=50)
    x = peaked_qkv(1, 4, 2, 200, 64, seed=4)
    state = new_state(cfg, x.k, KeySpan.from_lengths(torch.tensor([120]), 200))
    assert state.room == 80 and state.fixed_capacity() == 2 + 80
    for e in range(121, 191):
        span = KeySpan.from_lengths(torch.tensor([e]), 200)
        state.labels.scatter_(2, torch.full((1, 2, 1), e - 1), -1)  # what refresh() marks
    state.appended = 70
    sel = tactic.select(x.q, x.k, state, span, cfg, 0.125)
    kept = ops.indices_to_mask(sel.indices, sel.counts, 200)
    assert kept[..., :2].all() and kept[..., 120:190].all()  # sink, and every written token
    assert not kept[..., 190:].any()
    # a growing cache has no free positions: the bound is the tokens appended so far
    grown = new_state(cfg, x.k[:, :, :120], KeySpan.full(1, 120))
    assert grown.room == 0 and grown.unclustered() == 0


def test_refresh_reclusters_in_place_for_cuda_graphs():
    cfg = na.make_config("tactic", p=0.9, cluster_size=8, iterations=2, recluster_every=3)
    x = peaked_qkv(2, 4, 2, 300, 64, seed=9)
    span = KeySpan.from_lengths(torch.tensor([250, 240]), 300)
    state = new_state(cfg, x.k, span)
    ptrs = {f: getattr(state, f).data_ptr() for f in ("centroids", "labels", "sizes", "members",
                                                      "offsets", "spread", "ends")}
    for step in range(1, 4):
        span = KeySpan.from_lengths(torch.tensor([250 + step, 240 + step]), 300)
        state.refresh(x.k, span)
        if step < 3:  # the new token is unclustered, hence always kept
            assert (state.labels[0, :, 250 + step - 1] == -1).all()
    assert state.appended == 0 and (state.ends == torch.tensor([253, 243])).all()
    assert (state.labels[0, :, :253] >= 0).all() and (state.labels[1, :, 240:243] >= 0).all()
    assert {f: getattr(state, f).data_ptr() for f in ptrs} == ptrs  # same buffers
    fresh = new_state(cfg, x.k, span)
    for f in ("centroids", "labels", "sizes", "spread"):
        assert torch.equal(getattr(state, f), getattr(fresh, f)), f


def test_outliers_become_exact_singletons():
    x = peaked_qkv(1, 4, 2, 400, 64, seed=2)
    span = KeySpan.full(1, 400)
    cfg = na.make_config("tactic", cluster_size=16, iterations=3, outliers=0.05)
    state = new_state(cfg, x.k, span)
    c0 = math.ceil(4096 / 16)  # the K-means clusters of one segment come first
    single = state.sizes[..., c0:]
    assert single.shape[-1] == 20 and (single == 1).all()
    # a singleton's centroid is its key, its spread 0: its score is the key's exact score
    for h in range(2):
        for c in range(c0, c0 + 20):
            pos = int(state.members[0, h, state.offsets[0, h, c]])
            torch.testing.assert_close(state.centroids[0, h, c], x.k[0, h, pos])
            assert state.spread[0, h, c] == 0
    assert (state.sizes.sum(-1) == 400).all()
