"""Shared checks of the Triton kernels against their torch references and float64.

Each ``check_*`` function draws fresh random inputs for one shape on one device, runs the
op with ``impl="triton"`` on poisoned output buffers (every element the kernel should
write starts as NaN or a sentinel) and with ``impl="torch"``, and compares both with each
other and with a float64 computation. The CPU tests (``tests/test_ops_*.py``) call them on
small shapes in Triton's interpreter, the GPU tests (``tests/gpu``) at full size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch

from nucleus_attn import ops
from nucleus_attn.span import KeySpan

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
REL64 = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # vs float64


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run Triton kernels in Triton's CPU interpreter for the duration of a test.

    Needs triton imported in interpreter mode (``tests/conftest.py`` sets
    ``TRITON_INTERPRET=1`` before that on machines without CUDA).
    """
    pytest.importorskip("triton")
    from triton.language import standard

    if type(standard.max).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (a CUDA machine): the "
                    "interpreter tests run on CPU-only machines, tests/gpu covers the kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("NUCLEUS_ATTN_BACKEND", raising=False)


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Make ``torch.empty``/``empty_like`` return poison (NaN, or -7 / 0xA5 / True), so that
    an element a kernel forgets to write shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        if t.dtype == torch.uint8:
            return t.fill_(0xA5)
        return t.fill_(-7)

    torch.empty = lambda *a, **k: poison(empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype, device: str,
          scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)


def random_span(b: int, n: int, g: torch.Generator, device: str, ragged: bool) -> KeySpan:
    """All positions valid, or random left and right padding (at least one valid key)."""
    if not ragged:
        return KeySpan.full(b, n, device)
    starts = torch.randint(0, max(1, n // 3), (b,), generator=g)
    ends = torch.minimum(starts + 1 + torch.randint(0, n, (b,), generator=g), torch.tensor(n))
    starts[0], ends[0] = 0, n  # one full row
    return KeySpan(starts.to(device), ends.to(device), n)


def random_indices(b: int, h: int, n: int, m: int, g: torch.Generator, device: str,
                   counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, M]`` distinct positions per row (M <= N) and ragged counts in [1, M]."""
    idx = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(b * h)]).view(b, h, m)
    if counts is None:
        counts = torch.randint(1, m + 1, (b, h), generator=g)
        counts[0, 0] = m
    return idx.to(device), counts.to(device)


def assert_close_ulps(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, ulps: float,
                      what: str) -> None:
    """``|out - ref| <= ulps * eps(dtype) * max(1, max|ref|)``, same non-finite pattern."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), f"{what}: non-finite entries differ"
    assert torch.equal(out[~fin], ref[~fin]), f"{what}: infinities differ"
    if fin.any():
        o, r = out[fin].double(), ref[fin].double()
        tol = ulps * EPS[dtype] * max(1.0, r.abs().max().item())
        err = (o - r).abs().max().item()
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double().cpu(), ref.double().cpu()
    return ((o - r).norm() / r.norm().clamp(min=1e-30)).item()


# --- pages -------------------------------------------------------------------------------

def check_page_minmax(device: str, b: int, h: int, n: int, d: int, page_size: int,
                      dtype: torch.dtype, ragged: bool, first_page: int, seed: int) -> None:
    g = gen(seed)
    k = randn((b, h, n, d), g, dtype, device)
    span = random_span(b, n, g, device, ragged)
    first = min(first_page, math.ceil(n / page_size) - 1)
    with poisoned_empty():
        got = ops.page_minmax(k, span, page_size, first, impl="triton")
    ref = ops.page_minmax(k, span, page_size, first, impl="torch")
    ref64 = ops.page_minmax(k.double(), span, page_size, first, impl="torch")
    for o, r, r64, name in zip(got, ref, ref64, ("kmin", "kmax"), strict=True):
        assert o.dtype == dtype and torch.equal(o, r), f"{name} differs from the reference"
        assert torch.equal(o.double(), r64), f"{name} differs from float64"


def check_page_scores(device: str, b: int, hkv: int, group: int, pages: int, d: int,
                      page_size: int, dtype: torch.dtype, ragged: bool, seed: int) -> None:
    g = gen(seed)
    n = pages * page_size - (page_size // 2 if page_size > 1 else 0)
    k = randn((b, hkv, n, d), g, dtype, device)
    span = random_span(b, n, g, device, ragged)
    kmin, kmax = ops.page_minmax(k, span, page_size, impl="torch")
    q = randn((b, hkv * group, d), g, dtype, device)
    with poisoned_empty():
        got = ops.page_scores(q, kmin, kmax, span, page_size, impl="triton")
    ref = ops.page_scores(q, kmin, kmax, span, page_size, impl="torch")
    ref64 = ops.page_scores(q.double(), kmin.double(), kmax.double(), span, page_size,
                            impl="torch")
    scale = (q.double().abs().sum(-1).max() * kmax.double().abs().max()).item() + 1.0
    tol = 4 * d * EPS[torch.float32] * scale
    assert torch.equal(got.isinf(), ref.isinf()) and not got.isnan().any()
    fin = torch.isfinite(ref)
    assert (got[fin].double() - ref[fin].double()).abs().max().item() <= tol
    assert (got[fin].double() - ref64.to(got.device)[fin]).abs().max().item() <= tol


def check_topk_pages(device: str, b: int, hkv: int, group: int, n: int, page_size: int,
                     k_pages: int, sink: int, window: int, ragged: bool, seed: int) -> None:
    g = gen(seed)
    span = random_span(b, n, g, device, ragged)
    pages = math.ceil(n / page_size)
    bounds = torch.randn(b, hkv * group, pages, generator=g).to(device) * 5
    valid = ops.page_valid(span, page_size, pages)[:, None, :]
    bounds = torch.where(valid, bounds, torch.full_like(bounds, float("-inf")))
    with poisoned_empty():
        idx, cnt = ops.topk_pages(bounds, hkv, span, page_size, k_pages, sink, window, 0.3,
                                  impl="triton")
    ridx, rcnt = ops.topk_pages(bounds, hkv, span, page_size, k_pages, sink, window, 0.3,
                                impl="torch")
    assert torch.equal(cnt, rcnt), "kept token counts differ"
    assert torch.equal(idx, ridx), "kept positions (or the zero padding after them) differ"
    kept = ops.indices_to_mask(idx, cnt, n)
    assert (kept.sum(-1) == cnt).all()
    lo, hi = span.starts.view(b, 1, 1), span.ends.view(b, 1, 1)
    pos = torch.arange(n, device=device)
    assert not (kept & ((pos < lo) | (pos >= hi))).any(), "a padding position was kept"


def check_page_stats(device: str, b: int, hkv: int, group: int, pages: int, d: int,
                     dtype: torch.dtype, ragged: bool, seed: int) -> None:
    """page_scores(stats=True): the bounds as without stats, and statistics equal to the
    reference's over the same chunks (max/min exactly, sum of exp to float32 rounding);
    the top-k workspace handed over zeroed."""
    g = gen(seed)
    n = pages * 16 - 8
    k = randn((b, hkv, n, d), g, dtype, device)
    span = random_span(b, n, g, device, ragged)
    kmin, kmax = ops.page_minmax(k, span, 16, impl="torch")
    q = randn((b, hkv * group, d), g, dtype, device)
    with poisoned_empty():
        got, st = ops.page_scores(q, kmin, kmax, span, 16, stats=True, scale=0.3, impl="triton")
    plain = ops.page_scores(q, kmin, kmax, span, 16, impl="triton")
    assert torch.equal(got, plain), "stats changed the bounds"
    ref = ops.page_stats_reference(got, 0.3, st.chunk)
    assert st.scale == 0.3 and st.max.shape == ref.max.shape
    assert torch.equal(st.max, ref.max) and torch.equal(st.min, ref.min)
    torch.testing.assert_close(st.sumexp, ref.sumexp, rtol=1e-5, atol=1e-6)
    ws = st.take_workspace(st.workspace.numel())
    assert ws is not None and not ws.any(), "the handed-over workspace is not zeroed"
    assert st.take_workspace(ws.numel()) is None, "a workspace must be handed over once"


def check_topk_ties(device: str, b: int, hkv: int, group: int, n: int, k_pages: int,
                    levels: int, seed: int) -> None:
    """Integer-valued bounds (many exact ties): the kept pages are the forced ones plus the
    best others with ties broken by page order (a stable sort)."""
    g = gen(seed)
    ps, sink, window = 16, 4, 40
    pages = math.ceil(n / ps)
    span = random_span(b, n, g, device, True)
    bounds = torch.randint(0, levels, (b, hkv * group, pages), generator=g).float().to(device)
    valid = ops.page_valid(span, ps, pages)[:, None, :]
    bounds = torch.where(valid, bounds, torch.full_like(bounds, float("-inf")))
    with poisoned_empty():
        idx, cnt = ops.topk_pages(bounds, hkv, span, ps, k_pages, sink, window, 1.0,
                                  impl="triton")
    agg = ops.group_logsoftmax_max(bounds, hkv)
    pos = span.positions().expand(b, -1)
    forced_tok = torch.nn.functional.pad(span.forced(pos, sink, window), (0, pages * ps - n))
    forced = forced_tok.view(b, 1, pages, ps).any(-1).expand(b, hkv, pages)
    others = torch.where(forced | ~torch.isfinite(agg), float("-inf"), agg)
    order = torch.sort(others, dim=-1, descending=True, stable=True).indices
    room = (min(k_pages, pages) - forced.sum(-1, keepdim=True)).clamp(min=0)
    take = (torch.arange(pages, device=device) < room) & torch.isfinite(others.gather(-1, order))
    keep = forced | torch.zeros_like(forced).scatter(-1, order, take)
    ids = torch.where(keep, torch.arange(pages, device=device), pages).sort(-1).values
    want_idx, want_cnt = ops.pages_to_tokens(ids[..., :idx.shape[-1] // ps], ps, span)
    assert torch.equal(cnt, want_cnt), "kept token counts differ"
    assert torch.equal(idx, want_idx), "kept positions (or the zeros after them) differ"


# --- int4 keys ---------------------------------------------------------------------------

def check_quantize_int4(device: str, b: int, h: int, n: int, d: int, dtype: torch.dtype,
                        sliced: bool, seed: int) -> None:
    g = gen(seed)
    full = randn((b, h, n + 5, d), g, dtype, device, scale=3.0)
    k = full[:, :, 5:] if sliced else full[:, :, :n]  # a strided view, as in the append
    with poisoned_empty():
        codes, scale, zero = ops.quantize_int4(k, impl="triton")
    rc, rs, rz = ops.quantize_int4(k, impl="torch")
    assert codes.dtype == torch.uint8 and scale.dtype == dtype and zero.dtype == dtype
    assert torch.equal(scale, rs) and torch.equal(zero, rz), "scale/zero differ"
    assert torch.equal(codes, rc), "codes differ"
    # float64: the rounding error of each channel is at most half a step (plus the
    # rounding of zero to storage precision)
    deq = ops.dequantize_int4(codes, scale, zero).double()
    step = scale.double()[..., None]
    err = (deq - k.double()).abs()
    assert (err <= step / 2 + 2 * EPS[dtype] * k.double().abs().amax(-1, keepdim=True)
            + 1e-6).all()


def int4_error_bound(q: torch.Tensor, deq: torch.Tensor, zero: torch.Tensor,
                     sm: float) -> torch.Tensor:
    """``[B, Hq, N]`` bound of |estimate - sm * q . k^| (float64) for int4 keys ``deq``
    with their ``zero`` ``[B, Hkv, N]``: the query's int8 rounding (half a step per
    channel, times ``k^ - zero = scale * code``; the zero term uses the exact query), the
    float16 rounding of the estimate and float32 slack."""
    b, hq, d = q.shape
    hkv = deq.shape[1]
    grp = hq // hkv
    _, sq = ops.quantize_query(q)
    steps = (deq.double() - zero.double()[..., None]).abs()  # scale * code
    qerr = (sq.double() / 2)[..., None].view(b, hkv, grp, 1).expand(b, hkv, grp, d)
    bound = torch.einsum("bhgd,bhnd->bhgn", qerr, steps) * sm
    qg = q.double().view(b, hkv, grp, d)
    exact = torch.einsum("bhgd,bhnd->bhgn", qg, deq.double()) * sm
    kmax = deq.double().abs().max().item()
    f32 = 64 * d * EPS[torch.float32] * (q.double().abs().max().item() * kmax) * sm
    return (bound + exact.abs() * 2.0**-10 + f32 + 1e-6).reshape(b, hq, -1)


def check_int4_scores(device: str, b: int, hkv: int, group: int, n: int, m: int, d: int,
                      dtype: torch.dtype, seed: int) -> None:
    """Estimated logits over an index list: the kernel equals the reference (float16
    values, a one-ulp rounding difference allowed on a few), and both are within the
    query's int8 rounding of the float64 product with the dequantized keys."""
    g = gen(seed)
    k = randn((b, hkv, n, d), g, dtype, device)
    q = randn((b, hkv * group, d), g, dtype, device)
    codes, scale, zero = ops.quantize_int4(k, impl="torch")
    idx, cnt = random_indices(b, hkv, n, m, g, device)
    sm = 1 / math.sqrt(d)
    with poisoned_empty():
        got = ops.int4_scores(q, codes, scale, zero, idx, cnt, sm, impl="triton")
    ref = ops.int4_scores(q, codes, scale, zero, idx, cnt, sm, impl="torch")
    _check_estimates(got, ref)
    deq = ops.dequantize_int4(codes, scale, zero).double()
    gathered = deq.gather(2, idx[..., None].expand(b, hkv, m, d))
    bound = int4_error_bound(q, gathered, zero.gather(2, idx), sm)
    exact = ops.gathered_scores(q.double(), deq, idx, cnt, sm, impl="torch")
    fin = torch.isfinite(ref)
    assert ((got.double() - exact).abs()[fin] <= bound[fin]).all(), "estimate vs float64"


def _check_estimates(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Same -inf pattern, no NaN, float16 values equal but for a one-ulp rounding on at
    most 2 in 100 of them (float32 rounding of the two terms before the float16 one)."""
    assert torch.equal(got.isinf(), ref.isinf()) and not got.isnan().any()
    fin = torch.isfinite(ref)
    g64, r64 = got[fin].double(), ref[fin].double()
    assert torch.equal(g64.half().double(), g64), "estimates are not float16 values"
    big = torch.maximum(g64.abs(), r64.abs()).clamp(min=2.0**-14)
    ulp = torch.exp2(torch.floor(torch.log2(big)) - 10)  # float16 spacing there
    # near 0 the float32 cancellation of the two terms outweighs the float16 rounding
    tol = torch.maximum(ulp, 1e-5 * r64.abs().max())
    diff = (g64 - r64).abs()
    assert (diff <= tol).all(), f"estimates differ by more than an ulp: {diff.max()}"
    assert (diff > 0).float().mean().item() <= 0.02, "too many estimates differ"


def check_int4_estimates(device: str, b: int, hkv: int, group: int, n: int, m: int | None,
                         d: int, dtype: torch.dtype, seed: int) -> None:
    """The hot path's estimates (index list, or range mode with ``m=None``): values as the
    reference gives them, chunk maxima of those values, a zeroed workspace handed over."""
    g = gen(seed)
    k = randn((b, hkv, n, d), g, dtype, device)
    q = randn((b, hkv * group, d), g, dtype, device, scale=2.0)
    codes, scale, zero = ops.quantize_int4(k, impl="torch")
    sm = 1 / math.sqrt(d)
    if m is None:
        kw: dict = {"span": random_span(b, n, g, device, True)}
    else:
        idx, cnt = random_indices(b, hkv, n, m, g, device)
        kw = {"span": KeySpan.full(b, n, device), "indices": idx, "counts": cnt}
    with poisoned_empty():
        est = ops.int4_estimates(q, codes, scale, zero, sm, impl="triton", **kw)
    ref = ops.int4_estimates(q, codes, scale, zero, sm, impl="torch", **kw)
    assert est.values.dtype == torch.float16 and est.values.shape == ref.values.shape
    _check_estimates(est.head_major(), ref.head_major())
    from nucleus_attn.ops.topp import chunk_maxima

    assert torch.equal(est.chunk_max, chunk_maxima(est.values, est.live())), "chunk maxima"
    from nucleus_attn.ops import topp_binned

    ws = est.take_workspace(topp_binned.workspace_numel(b * hkv, group))
    assert ws is not None and not ws.any(), "the handed-over workspace is not zeroed"


# --- top-p -------------------------------------------------------------------------------

def topp_logits(b: int, hq: int, m: int, kind: str, g: torch.Generator) -> torch.Tensor:
    """``[B, Hq, M]`` logits of one of the awkward kinds the top-p rule is tested on."""
    x = torch.randn(b, hq, m, generator=g) * 3
    if kind == "peaked":  # the benchmark's: a few per cent of the tokens hold the nucleus
        x = torch.randn(b, hq, m, generator=g) * 6
    elif kind == "ties":  # a few distinct values: many weights tie at the threshold
        x = torch.round(x * 2) / 2
    elif kind == "sink":  # a few heavy items hold most of the mass
        x[..., :4] += 15
    elif kind == "flat":  # the nucleus is most of the row, weights almost equal
        x = torch.randn(b, hq, m, generator=g) * 0.01
    elif kind == "sea":  # one dominant sink over a flat sea of light tokens
        x = torch.randn(b, hq, m, generator=g) * 0.1 - 6
        x[..., 0] = 0.0
    elif kind == "planted":  # a few heavy keys planted in Gaussian noise
        x = torch.randn(b, hq, m, generator=g)
        x = x + 8 * (torch.rand(b, hq, m, generator=g) < 0.005)
    elif kind == "laplace":  # heavy tails (Laplace, scale 2)
        u = torch.rand(b, hq, m, generator=g) - 0.5
        x = -2.0 * torch.sign(u) * torch.log1p(-2 * u.abs())
    elif kind == "neginf":  # one query head sees no finite logit
        x[0, 0] = float("-inf")
    return x


def check_topp_contract(logits: torch.Tensor, live: torch.Tensor, positions: torch.Tensor,
                        kept: torch.Tensor, kcnt: torch.Tensor, p: float, n_pos: int,
                        forced: torch.Tensor | None = None) -> None:
    """The binned rule's contract against the exact (sort-based) nucleus, in float64: per
    query head the kept candidates hold at least p of the mass; per KV head the kept set
    has at most 2% more tokens than the union of the exact nuclei and the forced tokens,
    plus 16. ``live``/``positions``/``forced`` are ``[B, Hkv, M]`` over ``logits [B, Hq, M]``."""
    b, hq, m = logits.shape
    hkv = live.shape[1]
    grp = hq // hkv
    x = torch.where(live.repeat_interleave(grp, 1), logits.double(),
                    torch.full((), float("-inf"), dtype=torch.float64))
    finite = torch.isfinite(x).any(-1)
    w = torch.softmax(torch.where(finite[..., None], x, torch.zeros_like(x)), -1)
    w = torch.where(torch.isfinite(x), w, torch.zeros_like(w))
    mask = ops.indices_to_mask(kept, kcnt, n_pos)
    kept_slot = mask.gather(-1, positions) & live
    mass = (w * kept_slot.repeat_interleave(grp, 1)).sum(-1)
    assert (mass[finite] >= p * (1 - 1e-5)).all(), f"a head keeps {mass[finite].min():.6f} < p"
    # the exact nucleus per query head: sorted weights, the shortest prefix reaching p
    # (ties at the threshold weight included)
    ws, order = torch.sort(w, -1, descending=True)
    csum = torch.cumsum(ws, -1)
    cut = (csum < p * csum[..., -1:] * (1 - 1e-12)).sum(-1, keepdim=True)
    thr = ws.gather(-1, cut.clamp(max=m - 1))
    nucleus = (w >= thr) & (w > 0) & finite[..., None]
    nucleus |= ~finite[..., None]  # a head with no finite logit keeps every candidate
    union = nucleus.view(b, hkv, grp, m).any(2) & live
    if forced is not None:
        union = union | (forced & live)
    extra = kept_slot.sum(-1) - union.sum(-1)
    limit = 0.02 * union.sum(-1) + 16
    assert (extra <= limit).all(), f"kept {extra.max().item()} tokens over the nucleus"


def check_topp_select(device: str, b: int, hkv: int, group: int, m: int, p: float, kind: str,
                      seed: int, range_mode: bool = False, forced_kind: str = "none") -> None:
    """The binned top-p kernels (index list or range mode) against the reference on logits
    of ``kind``: the same kept sets (a difference only from float32 rounding at a bin edge:
    a few tokens), positions ascending, twice the same result, and both meet the contract
    against the exact nucleus."""
    g = gen(seed)
    hq = hkv * group
    logits = topp_logits(b, hq, m, kind, g).to(device)
    forced = None
    kw: dict = {}
    if range_mode:
        span = random_span(b, m, g, device, True)
        live = span.valid_mask()[:, None, :].expand(b, hkv, m)
        positions = torch.arange(m, device=device).expand(b, hkv, m)
        n_pos = m
        kw = {"sink": 3, "window": 7}
        sw = span.forced(positions, 3, 7)
    else:
        n_pos = m + 37
        idx, cnt = random_indices(b, hkv, n_pos, m, g, device)
        idx = torch.sort(idx, -1).values
        live = torch.arange(m, device=device) < cnt[..., None]
        positions = idx
        sw = None
        if forced_kind == "mask":
            forced = (torch.rand(b, hkv, m, generator=g) < 0.02).to(device)
        elif forced_kind == "span":
            span = random_span(b, n_pos, g, device, True)
            kw = {"span": span, "sink": 4, "window": 16}
            sw = span.forced(idx, 4, 16)

    def run(impl: str):
        if range_mode:
            return ops.topp_select_range(logits, span, hkv, p, impl=impl, **kw)
        return ops.topp_select(logits, idx, cnt, p, forced, impl=impl, **kw)

    with poisoned_empty():
        kept, kcnt = run("triton")
    again, acnt = run("triton")
    assert torch.equal(kcnt, acnt), "not deterministic"
    rkept, rcnt = run("torch")
    mask = ops.indices_to_mask(kept, kcnt, n_pos)
    rmask = ops.indices_to_mask(rkept, rcnt, n_pos)
    assert torch.equal(mask, ops.indices_to_mask(again, acnt, n_pos)), "not deterministic"
    slot = torch.arange(m, device=device)
    live_k = slot < kcnt[..., None]
    big = torch.full_like(kept, n_pos + 1)
    ordered = torch.where(live_k, kept, big)
    assert (ordered[..., 1:] > ordered[..., :-1])[live_k[..., 1:]].all(), "not ascending"
    assert (mask.gather(-1, positions) <= live).all() and (kcnt <= live.sum(-1)).all()
    differ = (mask ^ rmask).sum(-1)
    assert (differ <= 2 + rcnt // 200).all(), f"kept sets differ by {differ.max().item()}"
    forced_all = forced if sw is None else (sw if forced is None else forced | sw)
    for k_, c_ in ((kept, kcnt), (rkept, rcnt)):
        check_topp_contract(logits, live, positions, k_, c_, p, n_pos, forced_all)


# --- attention ---------------------------------------------------------------------------

def check_gathered_scores(device: str, b: int, hkv: int, group: int, n: int, m: int, d: int,
                          dtype: torch.dtype, seed: int) -> None:
    g = gen(seed)
    q = randn((b, hkv * group, d), g, dtype, device)
    k = randn((b, hkv, n, d), g, dtype, device)
    idx, cnt = random_indices(b, hkv, n, m, g, device)
    sm = 1 / math.sqrt(d)
    with poisoned_empty():
        got = ops.gathered_scores(q, k, idx, cnt, sm, impl="triton")
    ref = ops.gathered_scores(q, k, idx, cnt, sm, impl="torch")
    ref64 = ops.gathered_scores(q.double(), k.double(), idx, cnt, sm, impl="torch")
    tol = 8 * math.sqrt(d) * EPS[torch.float32] * (q.double().abs().max()
                                                   * k.double().abs().max()).item()
    for r in (ref, ref64):
        assert torch.equal(got.isinf(), r.isinf()) and not got.isnan().any()
        fin = torch.isfinite(r)
        assert (got[fin].double() - r[fin].double()).abs().max().item() <= tol + 1e-6


def check_sparse_attention(device: str, b: int, hkv: int, group: int, n: int, m: int, d: int,
                           dtype: torch.dtype, seed: int, counts: list[int] | None = None) -> None:
    g = gen(seed)
    q = randn((b, hkv * group, d), g, dtype, device)
    k = randn((b, hkv, n, d), g, dtype, device)
    v = randn((b, hkv, n, d), g, dtype, device)
    c = None if counts is None else torch.tensor(counts).view(b, hkv)
    idx, cnt = random_indices(b, hkv, n, m, g, device, c)
    sm = 1 / math.sqrt(d)
    with poisoned_empty():
        got = ops.sparse_attention(q, k, v, idx, cnt, sm, impl="triton")
    ref = ops.sparse_attention(q, k, v, idx, cnt, sm, impl="torch")
    ref64 = ops.sparse_attention(q.double(), k.double(), v.double(), idx, cnt, sm, impl="torch")
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.isfinite(got).all(), "non-finite (unwritten?) output"
    # the kernel multiplies probabilities by V in V's precision (as flash attention does)
    assert_close_ulps(got, ref, dtype, 4 if dtype != torch.float32 else 64, "vs reference")
    assert rel_error(got, ref64) <= REL64[dtype]


def check_dense_attention(device: str, b: int, hkv: int, group: int, n: int, d: int,
                          dtype: torch.dtype, seed: int) -> None:
    """The range kernel over a random left- and right-padded span."""
    g = gen(seed)
    q = randn((b, hkv * group, d), g, dtype, device)
    k = randn((b, hkv, n, d), g, dtype, device)
    v = randn((b, hkv, n, d), g, dtype, device)
    span = random_span(b, n, g, device, ragged=True)
    sm = 1 / math.sqrt(d)
    with poisoned_empty():
        got = ops.dense_attention(q, k, v, span, sm, impl="triton")
    ref = ops.dense_attention(q, k, v, span, sm, impl="torch")
    ref64 = ops.dense_attention(q.double(), k.double(), v.double(), span, sm, impl="torch")
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.isfinite(got).all(), "non-finite (unwritten?) output"
    assert_close_ulps(got, ref, dtype, 4 if dtype != torch.float32 else 64, "vs reference")
    assert rel_error(got, ref64) <= REL64[dtype]


# --- clusters ----------------------------------------------------------------------------

def check_assign_nearest(device: str, b: int, h: int, n: int, c: int, d: int,
                         dtype: torch.dtype, seed: int) -> None:
    g = gen(seed)
    keys = randn((b, h, n, d), g, dtype, device)
    cents = randn((b, h, c, d), g, torch.float32, device)
    alive = (torch.rand(b, h, c, generator=g) > 0.2).to(device)
    alive[..., 0] = True
    with poisoned_empty():
        got = ops.assign_nearest(keys, cents, alive, impl="triton")
    ref = ops.assign_nearest(keys, cents, alive, impl="torch")
    assert got.dtype == torch.int64 and got.shape == ref.shape
    assert alive.gather(-1, got).all(), "a dead centroid was chosen"
    # float64 distances: the chosen centroid is the nearest up to float32 rounding
    dist = torch.cdist(keys.double().reshape(b * h, n, d), cents.double().reshape(b * h, c, d))
    dist = dist.view(b, h, n, c).masked_fill(~alive[:, :, None, :], float("inf")) ** 2
    best = dist.amin(-1)
    chosen = dist.gather(-1, got[..., None])[..., 0]
    scale = (keys.double().norm(dim=-1) ** 2 + cents.double().norm(dim=-1).amax(-1, keepdim=True)
             ** 2)
    assert ((chosen - best) <= 1e-5 * scale + 1e-6).all()
    assert (got == ref).float().mean() >= 0.99


def check_centroid_scores(device: str, b: int, hkv: int, group: int, c: int, d: int,
                          dtype: torch.dtype, cent_dtype: torch.dtype, seed: int) -> None:
    g = gen(seed)
    q = randn((b, hkv * group, d), g, dtype, device)
    cents = randn((b, hkv, c, d), g, cent_dtype, device)
    sizes = torch.randint(0, 3, (b, hkv, c), generator=g).to(device)
    with poisoned_empty():
        got = ops.centroid_scores(q, cents, sizes, 0.1, impl="triton")
    ref = ops.centroid_scores(q, cents, sizes, 0.1, impl="torch")
    ref64 = ops.centroid_scores(q.double(), cents.double(), sizes, 0.1, impl="torch")
    tol = 0.8 * math.sqrt(d) * EPS[torch.float32] * (q.double().abs().max()
                                                     * cents.double().abs().max()).item()
    for r in (ref, ref64):
        assert torch.equal(got.isinf(), r.isinf()) and not got.isnan().any()
        fin = torch.isfinite(r)
        assert (got[fin].double() - r[fin].double()).abs().max().item() <= tol + 1e-6


def check_cluster_tokens(device: str, b: int, h: int, n: int, c: int, capacity: int,
                         seed: int) -> None:
    g = gen(seed)
    labels = torch.randint(0, c, (b, h, n), generator=g)
    labels[..., ::7] = -1  # padding
    sizes = torch.stack([torch.bincount(r[r >= 0], minlength=c) for r in labels.view(-1, n)])
    sizes = sizes.view(b, h, c)
    members = torch.argsort(torch.where(labels >= 0, labels, c), dim=-1, stable=True).int()
    offsets = torch.cumsum(sizes, -1) - sizes
    order = torch.stack([torch.randperm(c, generator=g) for _ in range(b * h)]).view(b, h, c)
    size_r = sizes.gather(-1, order)
    take = torch.where(torch.rand(b, h, c, generator=g) < 0.3, size_r, 0)
    args = [t.to(device) for t in (order, take, offsets, members)]
    with poisoned_empty():
        tok, cnt, rank = ops.cluster_tokens(*args, capacity, impl="triton")
    rtok, rcnt, rrank = ops.cluster_tokens(*args, capacity, impl="torch")
    assert torch.equal(cnt, rcnt)
    live = torch.arange(capacity, device=device) < cnt[..., None]
    assert torch.equal(tok[live], rtok[live]) and torch.equal(rank[live], rrank[live])
    if n * c > 10**6:  # the brute force below is for small shapes
        return
    # brute force: the members of the taken clusters, in rank order
    labels, order, take, rtok, rcnt = (t.cpu() for t in (labels, order, take, rtok, rcnt))
    for i in range(b):
        for j in range(h):
            want = [p for r in range(c) if take[i, j, r] > 0
                    for p in torch.nonzero(labels[i, j] == order[i, j, r]).flatten().tolist()]
            want = want[:capacity]
            assert rtok[i, j, :len(want)].tolist() == want
            assert rcnt[i, j].item() == len(want)
