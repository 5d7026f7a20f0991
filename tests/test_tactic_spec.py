"""Tactic's selection, which works per cluster (members lists, no per-token pass), against
the token-level definition it was written from (kept here as the specification)."""

from __future__ import annotations

import math

import pytest
import torch
from ops_helpers import interpreter, poisoned_empty

import nucleus_attn as na
from nucleus_attn import ops
from nucleus_attn.decode import new_state
from nucleus_attn.methods import tactic
from nucleus_attn.span import KeySpan
from nucleus_attn.synthetic import peaked_qkv


def tactic_token_level(q, k, state, span, cfg, scale):
    """The token-level definition: every per-token quantity as a [B, Hkv, N] tensor."""
    b, hq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    labels = state.labels[:, :, :n]
    c = state.sizes.shape[-1]
    cs = ops.centroid_scores(q, state.centroids, state.sizes, scale, impl="torch")
    order = torch.argsort(ops.group_logsoftmax_max(cs, hkv), dim=-1, descending=True)
    ranks = torch.arange(c).expand_as(order)
    rank_of = torch.empty_like(order).scatter_(-1, order, ranks)
    size_r = state.sizes.gather(-1, order).float()
    cum = torch.cumsum(size_r, -1)
    before = cum - size_r
    total = cum[..., -1:]
    tok_rank = torch.where(labels >= 0, rank_of.gather(-1, labels.clamp(min=0)),
                           torch.full_like(labels, c))
    head_tokens = torch.ceil(cfg.exact_fraction * total).clamp(min=1)
    n_head = (before < head_tokens).sum(-1, keepdim=True)
    segs = [(cum > torch.floor(f * total)) & (before < torch.floor(f * total) + cfg.sample_tokens)
            for f in cfg.sample_positions]
    valid = span.valid_mask()[:, None, :]
    fixed = valid & ((labels < 0) | span.forced(span.positions().expand(b, -1), cfg.sink,
                                                 cfg.window)[:, None, :])
    in_head_tok = tok_rank < n_head
    seg_tok = [s.gather(-1, tok_rank.clamp(max=c - 1)) & (tok_rank < c) for s in segs]
    scored = fixed | in_head_tok | seg_tok[0] | seg_tok[1]
    idx, cnt = ops.mask_to_indices(scored)
    w = ops.topp_weights(ops.gathered_scores(q, k, idx, cnt, scale, impl="torch"))
    live = torch.arange(idx.shape[-1]) < cnt[..., None]

    def per_token(x):
        return x.gather(-1, idx).repeat_interleave(g, dim=1) & live.repeat_interleave(g, dim=1)

    is_fixed, is_head = per_token(fixed), per_token(in_head_tok)
    rank_m = tok_rank.gather(-1, idx).repeat_interleave(g, dim=1)
    e_fixed = (w * is_fixed).sum(-1, keepdim=True)
    ys, xs = [], []
    for s, st in zip(segs, seg_tok, strict=True):
        tok = per_token(st)
        ys.append((w * tok).sum(-1, keepdim=True) / tok.sum(-1, keepdim=True).clamp(min=1))
        lo = torch.where(s, before, torch.full_like(before, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(s, cum, torch.zeros_like(cum)).amax(-1, keepdim=True)
        xs.append(((lo + hi) / 2 + 0.5).clamp(min=1).repeat_interleave(g, dim=1))
    (y1, y2), (x1, x2) = ys, xs
    a = ((y1 - y2) / (1 / x1 - 1 / x2).clamp(min=1e-12)).clamp(min=0)
    bb = torch.where(a > 0, y1 - a / x1, (y1 + y2) / 2)
    bucket = torch.where(is_head & ~is_fixed, rank_m, torch.full_like(rank_m, c))
    exact = torch.zeros(b, hq, c + 1).scatter_add_(-1, bucket, w)[..., :c]
    fitted = (tactic.curve_sum(a, bb, cum.repeat_interleave(g, 1))
              - tactic.curve_sum(a, bb, before.repeat_interleave(g, 1)))
    est = torch.where(torch.arange(c) < n_head.repeat_interleave(g, 1), exact, fitted)
    mass_before = e_fixed + torch.cumsum(est, -1) - est
    z = e_fixed + est.sum(-1, keepdim=True)
    prefix = (mass_before < cfg.p * z).sum(-1).view(b, hkv, g).amax(-1, keepdim=True)
    return fixed | (valid & (tok_rank < prefix))


@pytest.mark.parametrize(("p", "n", "hq", "hkv", "ragged", "appended"), [
    (0.9, 1000, 8, 2, False, 0), (0.6, 4099, 4, 1, True, 0), (0.99, 777, 6, 2, True, 40),
    (0.9, 2000, 8, 1, False, 300), (0.75, 300, 3, 3, False, 0)])
def test_cluster_level_selection_matches_token_level(p, n, hq, hkv, ragged, appended):
    x = peaked_qkv(2, hq, hkv, n, 64, spread=3.0, seed=n)
    cfg = na.make_config("tactic", p=p, cluster_size=8, iterations=3, segment=512)
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
    # equal, up to float32 summation order deciding a cluster at the p boundary
    diff = (got ^ spec).sum(-1)
    assert (diff <= state.max_size).all(), f"kept sets differ by {diff.tolist()} tokens"
    assert (diff == 0).float().mean() >= 0.5


@pytest.mark.usefixtures(interpreter.__name__)
def test_triton_path_matches_torch_path(monkeypatch):
    # the Triton path leaves list slots past their counts unwritten: poison them
    x = peaked_qkv(2, 8, 2, 1500, 64, spread=3.0, seed=5)
    cfg = na.make_config("tactic", p=0.9, cluster_size=8, iterations=2, segment=512)
    span = KeySpan.from_lengths(torch.tensor([1500, 1400]), 1500)
    state = new_state(cfg, x.k, span)
    sel = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", backend)
        with poisoned_empty():
            s = tactic.select(x.q, x.k, state, span, cfg, 0.125)
        sel[backend] = ops.indices_to_mask(s.indices, s.counts, 1500)
    assert torch.equal(sel["torch"], sel["triton"])
