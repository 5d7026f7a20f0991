"""Quest page metadata: per-page channel-wise key min/max, and page upper-bound scores.

A page is ``page_size`` consecutive positions of the cache. For a query q, the score of
a page is an upper bound of q.k over its keys (Quest):
``sum_c max(q_c * max_c, q_c * min_c)``. Reading the bounds costs 2/page_size of the keys,
which is how Quest and Twilight's base selector avoid reading every key.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..span import KeySpan
from ._dispatch import use_triton
from .select import compact


def num_pages(n: int, page_size: int) -> int:
    return math.ceil(n / page_size)


def page_valid(span: KeySpan, page_size: int, pages: int) -> Tensor:
    """``[B, P]`` bool: the page holds at least one valid key."""
    first = torch.arange(pages, device=span.starts.device)[None, :] * page_size
    return (first < span.ends[:, None]) & (first + page_size > span.starts[:, None])


# --- page min/max ------------------------------------------------------------------------

def page_minmax_reference(
    k: Tensor, span: KeySpan, page_size: int, first_page: int = 0
) -> tuple[Tensor, Tensor]:
    """Min and max key of each page from ``first_page`` on, over valid keys only.

    Parameters
    ----------
    k : Tensor
        ``[B, Hkv, N, d]`` keys (post-RoPE).
    span : KeySpan
        Valid positions; padding never enters a bound.
    page_size : int
        Positions per page.
    first_page : int
        Pages before it are not recomputed (used by the append update).

    Returns
    -------
    kmin, kmax : Tensor
        ``[B, Hkv, P - first_page, d]`` in k's dtype; pages without a valid key hold 0.
    """
    b, h, n, d = k.shape
    pages = num_pages(n, page_size) - first_page
    start = first_page * page_size
    pad = pages * page_size - (n - start)
    kk = torch.nn.functional.pad(k[:, :, start:], (0, 0, 0, pad))
    valid = torch.nn.functional.pad(span.valid_mask()[:, start:], (0, pad))
    valid = valid[:, None, :, None]
    # reads: all keys once; writes: 2 * pages * d
    inf = torch.tensor(float("inf"), dtype=k.dtype, device=k.device)
    kmin = torch.where(valid, kk, inf).view(b, h, pages, page_size, d).amin(3)
    kmax = torch.where(valid, kk, -inf).view(b, h, pages, page_size, d).amax(3)
    alive = valid.view(b, 1, pages, page_size).any(-1, keepdim=True)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(alive, kmin, zero), torch.where(alive, kmax, zero)


def page_minmax(
    k: Tensor, span: KeySpan, page_size: int, first_page: int = 0, *, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Per-page key bounds; see :func:`page_minmax_reference` for the contract."""
    use_triton(impl, k)  # the Triton kernel is wired in by ops' kernel work
    return page_minmax_reference(k, span, page_size, first_page)


# --- page scores -------------------------------------------------------------------------

def page_scores_reference(
    q: Tensor, kmin: Tensor, kmax: Tensor, span: KeySpan, page_size: int
) -> Tensor:
    """Upper bound of q.k per page and query head.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    kmin, kmax : Tensor
        ``[B, Hkv, P, d]`` page bounds.

    Returns
    -------
    Tensor
        ``[B, Hq, P]`` float32 (not multiplied by the softmax scale); pages with no
        valid key are ``-inf``.
    """
    b, hq, d = q.shape
    hkv, p = kmin.shape[1], kmin.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, 1, d)
    # reads: 2 * P * d bounds per KV head, shared by the group's query heads
    lo = qg * kmin.float()[:, :, None]
    hi = qg * kmax.float()[:, :, None]
    s = torch.maximum(lo, hi).sum(-1).view(b, hq, p)
    alive = page_valid(span, page_size, p)[:, None, :]
    return torch.where(alive, s, torch.full_like(s, float("-inf")))


def page_scores(
    q: Tensor, kmin: Tensor, kmax: Tensor, span: KeySpan, page_size: int, *, impl: str = "auto"
) -> Tensor:
    """Quest page upper bounds; see :func:`page_scores_reference` for the contract."""
    use_triton(impl, q, kmin)
    return page_scores_reference(q, kmin, kmax, span, page_size)


# --- pages -> tokens ---------------------------------------------------------------------

def pages_to_tokens(page_ids: Tensor, page_size: int, span: KeySpan) -> tuple[Tensor, Tensor]:
    """Token positions of the chosen pages, ascending, padding and out-of-span removed.

    ``page_ids`` is ``[B, Hkv, K]``; returns ``indices [B, Hkv, K * page_size]`` and
    ``counts [B, Hkv]``.
    """
    b, h, kp = page_ids.shape
    ordered = torch.sort(page_ids, dim=-1).values
    tok = ordered[..., None] * page_size + torch.arange(page_size, device=page_ids.device)
    tok = tok.view(b, h, kp * page_size)
    s, e = span.starts.view(b, 1, 1), span.ends.view(b, 1, 1)
    return compact(tok, (tok >= s) & (tok < e))
