"""Whole decode steps on the GPU: every method with the Triton backend against the torch
backend at B=4, N=32k, and one decode step per method captured in a CUDA graph (no host
synchronisation inside a step) and replayed on new queries."""

from __future__ import annotations

import math

import pytest
import torch

import nucleus_attn as na
from nucleus_attn.bench.kernels import LLAMA3_8B, capture_graph, peaked_inputs
from nucleus_attn.decode import decode_step, new_state
from nucleus_attn.span import KeySpan

DEV = torch.device("cuda")
SETTINGS = {"dense": {}, "oracle-topk": {"budget": 0.02}, "oracle-topp": {"p": 0.9},
            "streaming": {"sink": 4, "window": 0.05}, "quest": {"budget": 0.05},
            "twilight": {"p": 0.9}, "tactic": {"p": 0.9}}


def exact_over(q, k, v, mask):
    """float64 attention of each query head over its KV head's kept mask."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    s = torch.einsum("bhgd,bhnd->bhgn", q.view(b, hkv, hq // hkv, d).double(), k.double())
    s = s / math.sqrt(d)
    s = s.masked_fill(~mask[:, :, None], float("-inf"))
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), v.double()).reshape(b, hq, d)


def test_every_method_is_in_the_table():
    assert set(SETTINGS) == set(na.methods())


@pytest.mark.parametrize("method", list(SETTINGS))
def test_triton_matches_torch_backend(method, monkeypatch):
    n, b = 32768, 4
    q, k, v = peaked_inputs(b, LLAMA3_8B, n, 8.0, 1, DEV)
    lengths = torch.tensor([n, n - 1000, 17000, 4099], device=DEV)
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NUCLEUS_ATTN_BACKEND", backend)
        out, info = na.sparse_decode(q, k, v, method, lengths=lengths, dense_below=0,
                                     **SETTINGS[method])
        mask = info.kept_mask(n)
        assert torch.isfinite(out).all()
        # each backend's output is exact attention over the set it kept
        ref = exact_over(q, k, v, mask)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"{backend}: {rel}"
        runs[backend] = (out, info, mask)
    (o_t, _, m_t), (o_g, _, m_g) = runs["torch"], runs["triton"]
    union = (m_t | m_g).sum().item()
    agree = 1 - (m_t ^ m_g).sum().item() / max(union, 1)
    # selections agree up to float rounding at thresholds (Tactic: also its K-means,
    # whose float32 distance ties may resolve differently)
    assert agree >= (0.9 if method == "tactic" else 0.995), f"kept sets agree {agree:.4f}"
    if torch.equal(m_t, m_g):
        torch.testing.assert_close(o_g.float(), o_t.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["dense", "quest", "twilight", "tactic"])
def test_decode_step_captures_in_a_cuda_graph(method):
    n, b = 8192, 2
    params = {"dense": {}, "quest": {"budget": 0.05}, "twilight": {"p": 0.9},
              "tactic": {"p": 0.9}}[method]
    q0, k, v = peaked_inputs(b, LLAMA3_8B, n, 8.0, 2, DEV)
    cfg = na.make_config(method, dense_below=0, **params)
    span = KeySpan.from_lengths(torch.tensor([n, n - 300], device=DEV), n)
    state = new_state(cfg, k, span)
    scale = 1 / math.sqrt(LLAMA3_8B.d)
    q_static = q0.clone()

    def step():
        return decode_step(q_static, k, v, cfg, state, span, scale)

    graph, (out_static, info_static) = capture_graph(step)  # compiled outside the capture
    for seed in range(3):
        g = torch.Generator(device=DEV).manual_seed(100 + seed)
        q_new = q0 + 0.5 * torch.randn(q0.shape, generator=g, device=DEV).to(q0.dtype)
        q_static.copy_(q_new)
        graph.replay()
        out, info = decode_step(q_new, k, v, cfg, state, span, scale)
        torch.cuda.synchronize()
        assert torch.equal(info_static.kept, info.kept)
        torch.testing.assert_close(out_static, out, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "params"), [
    ("quest", {"budget": 0.01}), ("twilight", {"p": 0.9}),
    ("twilight", {"p": 0.9, "base": "dense"}), ("twilight", {"p": 0.95, "base_budget": 0.5})])
def test_split_selection_captures_in_a_cuda_graph(method, params):
    """At 64k tokens the selection runs the split kernels (top-k over 4096 pages, binned
    top-p over 16k-64k candidates): one decode step captured once and replayed on new
    queries gives exactly the eager step's kept sets and output (no host sync,
    deterministic)."""
    from nucleus_attn.ops import topk_split

    n, b = 65536, 2
    assert topk_split.split_wanted(n // 16)
    q0, k, v = peaked_inputs(b, LLAMA3_8B, n, 8.0, 3, DEV)
    cfg = na.make_config(method, dense_below=0, **params)
    span = KeySpan.from_lengths(torch.tensor([n, n - 5000], device=DEV), n)
    state = new_state(cfg, k, span)
    scale = 1 / math.sqrt(LLAMA3_8B.d)
    q_static = q0.clone()

    def step():
        return decode_step(q_static, k, v, cfg, state, span, scale)

    graph, (out_static, info_static) = capture_graph(step)
    for seed in range(3):
        g = torch.Generator(device=DEV).manual_seed(200 + seed)
        q_new = q0 + 0.5 * torch.randn(q0.shape, generator=g, device=DEV).to(q0.dtype)
        q_static.copy_(q_new)
        graph.replay()
        out, info = decode_step(q_new, k, v, cfg, state, span, scale)
        torch.cuda.synchronize()
        assert torch.equal(info_static.kept, info.kept)
        assert torch.equal(info_static.kept_mask(n), info.kept_mask(n))  # (past the counts:
        torch.testing.assert_close(out_static, out, rtol=0, atol=0)  # unspecified)
    # and the kept set is the torch reference's (float32 rounding at a threshold aside)
    import os

    os.environ["NUCLEUS_ATTN_BACKEND"] = "torch"
    try:
        _, ref = decode_step(q_new, k, v, cfg, state, span, scale)
    finally:
        del os.environ["NUCLEUS_ATTN_BACKEND"]
    m_ref, m_got = ref.kept_mask(n), info.kept_mask(n)
    assert (m_ref ^ m_got).sum().item() <= 0.002 * m_ref.sum().item() + 2


@pytest.mark.parametrize("method", ["dense", "quest", "twilight", "tactic"])
def test_static_cache_model_step_replays_in_a_cuda_graph(method):
    """A whole model's decode step with sparse decode on, captured once in a CUDA graph and
    replayed with the position advanced on the device, gives the logits of eager steps."""
    from nucleus_attn.bench.e2e import TINY, DecodeLoop, build_model

    model = build_model(dict(TINY, num_hidden_layers=3), torch.bfloat16, DEV, 0)
    settings = {"dense": {}, "quest": {"budget": 64}, "twilight": {"p": 0.5, "base_budget": 256},
                "tactic": {"p": 0.5}}
    settings = {m: dict(s, dense_below=0) for m, s in settings.items()}  # no crossover here
    loop = DecodeLoop(model, 3, 1000, 16, 0)
    with na.enable(model, method, dense_layers=1, stats=False, **settings[method]):
        eager = [loop.step().clone() for _ in range(6)]
    loop.reset()
    with na.enable(model, method, dense_layers=1, stats=False, **settings[method]):
        loop.step()  # builds the state
        graph, logits = capture_graph(loop.step)
        replayed = []
        for _ in range(4):
            graph.replay()
            replayed.append(logits.clone())
    # eager steps 3..6 wrote the positions the replays wrote
    for got, want in zip(replayed, eager[2:], strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
