"""Checks of Tactic's selection kernels (``nucleus_attn.ops.tactic_select``) against their
torch references and float64, shared by the interpreter tests (``tests/test_tactic_*.py``)
and the GPU tests (``tests/gpu/test_gpu_tactic.py``).

Each ``check_*`` builds a clustered cache, runs one op with ``impl="triton"`` on poisoned
buffers and with ``impl="torch"`` on the same inputs, and compares. Lists the kernels fill
by atomics (the sampled clusters, the kept positions) are compared as sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ops_helpers import poisoned_empty

import nucleus_attn as na
from nucleus_attn import ops
from nucleus_attn.methods.tactic import ClusterState, TacticConfig
from nucleus_attn.ops import tactic_select as ts
from nucleus_attn.span import KeySpan
from nucleus_attn.synthetic import peaked_qkv


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    span: KeySpan
    state: ClusterState
    cfg: TacticConfig
    scale: float
    diffuse_expected: bool = False  # whether some cut falls past the head

    @property
    def labels(self) -> torch.Tensor:
        return self.state.labels[:, :, :self.k.shape[2]]

    def rank(self, impl: str) -> ts.ClusterRanking:
        spread = self.state.spread if self.cfg.spread_rank else None
        return ops.rank_clusters(self.q, self.state.centroids, self.state.sizes, spread,
                                 self.scale, head_fraction=self.cfg.exact_fraction,
                                 sample_positions=self.cfg.sample_positions,
                                 sample_tokens=self.cfg.sample_tokens, impl=impl)

    def lse(self, ranking: ts.ClusterRanking, impl: str) -> ts.ClusterMasses:
        s, c = self.state, self.cfg
        return ops.cluster_lse(self.q, self.k, ranking, s.members, s.offsets, s.sizes,
                               self.labels, self.span, s.ends, c.sink, c.window,
                               s.fixed_capacity(), self.scale, impl=impl)

    def cut(self, masses: ts.ClusterMasses, ranking: ts.ClusterRanking, impl: str):
        s, c = self.state, self.cfg
        return ops.tactic_cut(masses, ranking, c.p, self.labels, self.span, s.ends, c.sink,
                              c.window, s.fixed_capacity(), impl=impl)


def make_case(device: str, b: int, hq: int, hkv: int, n: int, d: int, dtype: torch.dtype,
              seed: int, *, ragged: bool = False, appended: int = 0, diffuse: bool = False,
              **params) -> Case:
    """A peaked decode query over a clustered cache (``diffuse``: a flat one, whose cut
    falls past the exactly scored head): ``appended`` tokens at the end were added after
    clustering; ``ragged`` pads the sequences left and right."""
    shape = {"planted": 0, "spread": 1.0} if diffuse else {"spread": 3.0}
    x = peaked_qkv(b, hq, hkv, n, d, seed=seed, **shape)
    q, k = x.q.to(device=device, dtype=dtype), x.k.to(device=device, dtype=dtype)
    params = {"p": 0.9, "cluster_size": 8, "iterations": 2, "segment": 256, **params}
    cfg = na.make_config("tactic", **params)
    if ragged:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, max(1, n // 4), (b,), generator=g)
        ends = n - torch.randint(0, max(1, n // 4), (b,), generator=g)
        span = KeySpan(starts.to(device), torch.maximum(ends, starts + 1).to(device), n)
    else:
        span = KeySpan.full(b, n, device)
    if appended:
        m = n - appended
        state = na.new_state(cfg, k[:, :, :m], KeySpan(span.starts, span.ends.clamp(max=m), m))
        state.extend(k, span)
    else:
        state = na.new_state(cfg, k, span)
    return Case(q, k, span, state, cfg, 1 / math.sqrt(d), diffuse)


def bins_float64(case: Case) -> torch.Tensor:
    """The clusters' bins computed in float64 (``[B, Hkv, C]``)."""
    q, s = case.q.double(), case.state
    b, hq, d = q.shape
    hkv = s.centroids.shape[1]
    sc = torch.einsum("bhgd,bhcd->bhgc", q.view(b, hkv, hq // hkv, d), s.centroids.double())
    sc = sc * case.scale
    if case.cfg.spread_rank:
        qn2 = (q * q).sum(-1).view(b, hkv, -1, 1)
        sc = sc + 0.5 * case.scale**2 * qn2 * s.spread.double()[:, :, None, :]
    sc = sc.masked_fill((s.sizes == 0)[:, :, None, :], float("-inf"))
    agg = (sc - torch.logsumexp(sc, -1, keepdim=True)).amax(2)
    raw = torch.floor(-agg * ts.BINS_PER_NAT).clamp(0, ts.RANK_BINS - 1)
    return torch.where(s.sizes > 0, raw, ts.RANK_BINS - 1).long()


def check_rank_clusters(case: Case) -> None:
    ref = case.rank("torch")
    with poisoned_empty():
        got = case.rank("triton")
    live = case.state.sizes > 0
    diff = (got.bins.long() - ref.bins.long()).abs()
    assert (diff <= 1).all() and (diff[live] == 0).float().mean() >= 0.99, diff.max()
    assert ((got.bins.long() - bins_float64(case)).abs()[live] <= 1).all()
    if torch.equal(got.bins, ref.bins):  # the rest follows from the bins exactly
        assert torch.equal(got.starts, ref.starts)
        assert torch.equal(got.plan, ref.plan)
    assert (got.starts[..., -1].long() == case.state.sizes.sum(-1)).all()


def _by_id(masses: ts.ClusterMasses, b: int, h: int, g: int):
    """Entries of one row as {cluster id: (bin, tokens, lse of each query head)}."""
    cnt = int(masses.count[b, h])
    out = {}
    for i in range(cnt):
        c = int(masses.ids[b, h, i])
        lse = tuple(float(masses.lse[b, h * g + j, i]) for j in range(g))
        out[c] = (int(masses.bins[b, h, i]), int(masses.tokens[b, h, i]), lse)
    return out


def check_cluster_lse(case: Case, atol: float = 1e-4) -> None:
    ranking = case.rank("torch")
    ref = case.lse(ranking, "torch")
    with poisoned_empty():
        got = case.lse(ranking, "triton")
    b, hq, _ = case.q.shape
    hkv = case.k.shape[1]
    g = hq // hkv
    assert torch.equal(got.count.long(), ref.count.long())
    assert (ref.count > 0).any(), "no cluster was sampled: the case tests nothing"
    for bi in range(b):
        for h in range(hkv):
            want, have = _by_id(ref, bi, h, g), _by_id(got, bi, h, g)
            assert set(want) == set(have)
            for c, (wb, wt, wl) in want.items():
                hb, ht, hl = have[c]
                assert (wb, wt) == (hb, ht)
                for x, y in zip(wl, hl, strict=True):
                    assert (math.isinf(x) and x == y) or abs(x - y) <= atol * max(1, abs(x))
    fin = torch.isfinite(ref.fixed_lse)
    assert torch.equal(fin, torch.isfinite(got.fixed_lse))
    torch.testing.assert_close(got.fixed_lse[fin], ref.fixed_lse[fin], atol=atol, rtol=atol)
    # float64: one sampled cluster's log-mass, and the always-kept tokens' total
    s = case.state
    qd, kd = case.q.double(), case.k.double()
    bi, h = 0, 0
    if int(ref.count[bi, h]):
        c = int(ref.ids[bi, h, 0])
        pos = s.members[bi, h, s.offsets[bi, h, c]:s.offsets[bi, h, c] + s.sizes[bi, h, c]].long()
        keep = ~case.span.forced(pos[None], case.cfg.sink, case.cfg.window)[0]
        if keep.any():
            lg = kd[bi, h, pos[keep]] @ qd[bi, h * g] * case.scale
            assert abs(torch.logsumexp(lg, 0).item() - float(ref.lse[bi, h * g, 0])) < 1e-3
    fpos, fcnt = ts.fixed_positions(case.span, s.ends, case.cfg.sink, case.cfg.window,
                                    s.fixed_capacity())
    lg = kd[0, 0, fpos[0, :int(fcnt[0])]] @ qd[0, 0] * case.scale
    assert abs(torch.logsumexp(lg, 0).item()
               - torch.logsumexp(got.fixed_lse[0, 0].double(), 0).item()) < 1e-3


def check_tactic_cut(case: Case) -> None:
    ranking = case.rank("torch")
    masses = case.lse(ranking, "torch")
    p_ref, i_ref, c_ref = case.cut(masses, ranking, "torch")
    with poisoned_empty():
        p_got, i_got, c_got = case.cut(masses, ranking, "triton")
    past_head = p_ref > ranking.plan[..., ts.PLAN_HEAD]
    if case.diffuse_expected:  # the cut past the head (the fitted curve) is exercised
        assert past_head.any(), "no cut falls past the head"
    # the same prefix up to float32 summation order deciding a bin at the boundary
    assert ((p_got.long() - p_ref.long()).abs() <= 1).all()
    assert (p_got == p_ref).float().mean() >= 0.75, (p_got, p_ref)
    for bi in range(p_ref.shape[0]):
        for h in range(p_ref.shape[1]):
            if p_got[bi, h] == p_ref[bi, h]:
                want = set(i_ref[bi, h, :int(c_ref[bi, h])].tolist())
                have = i_got[bi, h, :int(c_got[bi, h])].tolist()
                assert len(have) == len(set(have)) and set(have) == want


def check_append_clusters(case: Case) -> None:
    ranking = case.rank("torch")
    prefix, idx, cnt = case.cut(case.lse(ranking, "torch"), ranking, "torch")
    s = case.state
    outs = {}
    for impl in ("torch", "triton"):
        i, c = idx.clone(), cnt.clone()
        with poisoned_empty():
            ops.append_clusters(i, c, s.members, s.offsets, s.sizes, ranking.bins, prefix,
                                impl=impl)
        outs[impl] = (i, c)
    (i_t, c_t), (i_g, c_g) = outs["torch"], outs["triton"]
    assert torch.equal(c_t, c_g)
    live = torch.arange(i_t.shape[-1], device=c_t.device) < c_t[..., None]
    assert torch.equal(i_t[live], i_g[live])  # the same list, in the same order
    labels = case.labels
    for bi in range(cnt.shape[0]):
        for h in range(cnt.shape[1]):
            g = i_g[bi, h, :int(c_g[bi, h])].tolist()
            assert len(set(g)) == len(g)
            # exactly the members of the kept clusters, after the fixed tokens
            lab = labels[bi, h]
            kept_c = (s.sizes[bi, h] > 0) & (ranking.bins[bi, h].long() < int(prefix[bi, h]))
            members = set(torch.nonzero((lab >= 0) & kept_c[lab.clamp(min=0)]).flatten().tolist())
            extras = set(idx[bi, h, :int(cnt[bi, h])].tolist())
            assert not extras & members and set(g) == extras | members


def check_select(case: Case, monkeypatch) -> None:
    """The whole method, Triton path against torch path: the same kept sets up to a bin
    decided by float rounding."""
    from nucleus_attn.methods import tactic

    masks = {}
    n = case.k.shape[2]
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", backend)
        with poisoned_empty():
            sel = tactic.select(case.q, case.k, case.state, case.span, case.cfg, case.scale)
        mask = ops.indices_to_mask(sel.indices, sel.counts, n)
        assert torch.equal(mask.sum(-1), sel.counts), f"{backend}: a position is listed twice"
        assert not (mask & ~case.span.valid_mask()[:, None]).any(), "padding kept"
        masks[backend] = mask
    diff = (masks["torch"] ^ masks["triton"]).sum(-1)
    kept = masks["torch"].sum(-1).clamp(min=1)
    assert ((diff.float() / kept) <= 0.05).all(), (diff, kept)
