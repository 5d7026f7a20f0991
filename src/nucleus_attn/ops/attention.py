"""Decode attention: dense (SDPA) and gathered sparse attention over kept indices.

``sparse_attention`` is exact softmax attention restricted to each KV head's kept
positions, shared by the head's query heads (GQA-packed: a kept key/value is read once per
group). ``gathered_scores`` gives exact logits over an index set (oracles, Tactic's
sampled segments, diagnostics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..span import KeySpan
from ._dispatch import use_triton


def _gather_rows(x: Tensor, indices: Tensor) -> Tensor:
    """``x[b, h, indices[b, h, m], :]`` as ``[B, Hkv, M, d]``."""
    b, h, m = indices.shape
    return x.gather(2, indices[..., None].expand(b, h, m, x.shape[-1]))


# --- dense -------------------------------------------------------------------------------

def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, span: KeySpan | None, scale: float
) -> Tensor:
    """Exact decode attention over every valid key (torch SDPA, GQA without repeating KV).

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    k, v : Tensor
        ``[B, Hkv, N, d]``.
    span : KeySpan or None
        Valid keys; None means all N positions of every sequence (no mask, fastest).
    scale : float
        Softmax scale.

    Returns
    -------
    Tensor
        ``[B, Hq, d]`` in q's dtype.
    """
    mask = None if span is None else span.valid_mask()[:, None, None, :]
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return out[:, :, 0, :]


# --- exact logits over an index set ------------------------------------------------------

def gathered_scores_reference(
    q: Tensor, k: Tensor, indices: Tensor, counts: Tensor, scale: float
) -> Tensor:
    """Exact logits ``scale * q . k`` over each KV head's indexed keys.

    ``q [B, Hq, d]``, ``k [B, Hkv, N, d]``, ``indices [B, Hkv, M]``, ``counts [B, Hkv]``;
    returns ``[B, Hq, M]`` float32, ``-inf`` past counts.
    """
    b, hq, d = q.shape
    hkv, m = indices.shape[1], indices.shape[2]
    kg = _gather_rows(k, indices).float()
    s = torch.einsum("bhgd,bhmd->bhgm", q.float().view(b, hkv, hq // hkv, d), kg) * scale
    live = (torch.arange(m, device=q.device) < counts[..., None])[:, :, None]
    return torch.where(live, s, torch.full_like(s, float("-inf"))).view(b, hq, m)


def gathered_scores(
    q: Tensor, k: Tensor, indices: Tensor, counts: Tensor, scale: float, *, impl: str = "auto"
) -> Tensor:
    """Exact logits over index sets; see :func:`gathered_scores_reference`."""
    use_triton(impl, q, k)
    return gathered_scores_reference(q, k, indices, counts, scale)


# --- sparse attention --------------------------------------------------------------------

def sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor, scale: float
) -> Tensor:
    """Exact attention restricted to kept positions, fp32 accumulation.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    k, v : Tensor
        ``[B, Hkv, N, d]``.
    indices : Tensor
        ``[B, Hkv, M]`` int64 kept positions; the first ``counts`` are live.
    counts : Tensor
        ``[B, Hkv]`` int64, each >= 1.
    scale : float
        Softmax scale.

    Returns
    -------
    Tensor
        ``[B, Hq, d]`` in q's dtype.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    # reads: counts * 2 * d values per KV head, once for the whole group
    s = gathered_scores_reference(q, k, indices, counts, scale).view(b, hkv, hq // hkv, -1)
    probs = torch.softmax(s, dim=-1)
    out = torch.einsum("bhgm,bhmd->bhgd", probs, _gather_rows(v, indices).float())
    return out.reshape(b, hq, v.shape[-1]).to(q.dtype)


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    counts: Tensor,
    scale: float,
    *,
    impl: str = "auto",
) -> Tensor:
    """Gathered sparse decode attention; see :func:`sparse_attention_reference`."""
    use_triton(impl, q, k, v)
    return sparse_attention_reference(q, k, v, indices, counts, scale)
