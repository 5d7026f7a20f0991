"""Key clustering for Tactic: K-means per KV head, nearest-centroid assignment, centroid scores.

Keys are clustered once at prefill, per KV head, so that at decode the query is compared
with ~N/16 centroids instead of N keys. K-means runs on consecutive *segments* of the
cache (``segment`` positions each, ``segment / cluster_size`` clusters per segment):
this bounds the cost of an iteration at ``N * segment / cluster_size * d`` instead of
``N**2 / cluster_size * d`` at 128k tokens, and keeps the clustering of a prefix unchanged
when tokens are appended.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..span import KeySpan
from ._dispatch import use_triton

# --- nearest centroid --------------------------------------------------------------------

def assign_nearest_reference(keys: Tensor, centroids: Tensor, alive: Tensor) -> Tensor:
    """Index of the nearest live centroid (L2) of every key.

    Parameters
    ----------
    keys : Tensor
        ``[B, H, L, d]``.
    centroids : Tensor
        ``[B, H, C, d]`` float32.
    alive : Tensor
        ``[B, H, C]`` bool; dead centroids are never chosen.

    Returns
    -------
    Tensor
        ``[B, H, L]`` int64 (0 when no centroid is alive).
    """
    # argmin |k - c|^2 == argmax (k.c - |c|^2 / 2)
    score = torch.einsum("bhld,bhcd->bhlc", keys.float(), centroids)
    score = score - 0.5 * (centroids * centroids).sum(-1)[:, :, None, :]
    score = torch.where(alive[:, :, None, :], score, torch.full_like(score, float("-inf")))
    return score.argmax(-1)


def assign_nearest(keys: Tensor, centroids: Tensor, alive: Tensor, *, impl: str = "auto") -> Tensor:
    """Nearest-centroid labels; see :func:`assign_nearest_reference`."""
    use_triton(impl, keys, centroids)
    return assign_nearest_reference(keys, centroids, alive)


# --- K-means -----------------------------------------------------------------------------

def kmeans(
    k: Tensor,
    span: KeySpan,
    cluster_size: int,
    iterations: int,
    segment: int,
    *,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Segment-local K-means of the valid keys of each KV head.

    Centroids start at evenly spaced valid keys of their segment (deterministic); each
    iteration assigns every key to its nearest centroid and moves centroids to the mean
    of their members (a centroid without members stays, with size 0).

    Parameters
    ----------
    k : Tensor
        ``[B, Hkv, N, d]``.
    span : KeySpan
        Valid positions; padding is never clustered (its label is -1).
    cluster_size : int
        Average tokens per cluster: a segment of L positions gets ``ceil(L / cluster_size)``.
    iterations : int
        Assign/update rounds, >= 1.
    segment : int
        Positions per independently clustered segment.

    Returns
    -------
    centroids : Tensor
        ``[B, Hkv, C, d]`` float32, ``C = ceil(N / segment) * ceil(segment / cluster_size)``.
    labels : Tensor
        ``[B, Hkv, N]`` int64 cluster of each position, -1 for padding.
    sizes : Tensor
        ``[B, Hkv, C]`` int64 members per cluster (0: unused slot).
    """
    b, h, n, d = k.shape
    per_seg = math.ceil(segment / cluster_size)
    n_seg = math.ceil(n / segment)
    cents = torch.zeros(b, h, n_seg * per_seg, d, dtype=torch.float32, device=k.device)
    sizes = torch.zeros(b, h, n_seg * per_seg, dtype=torch.int64, device=k.device)
    labels = torch.full((b, h, n), -1, dtype=torch.int64, device=k.device)
    valid = span.valid_mask()
    for s in range(n_seg):
        lo, hi = s * segment, min(n, (s + 1) * segment)
        c = math.ceil((hi - lo) / cluster_size)
        keys = k[:, :, lo:hi].float()
        vm = valid[:, lo:hi]
        nvalid = vm.sum(-1)
        first = vm.to(torch.int8).argmax(-1)
        # each sequence gets ceil(valid / cluster_size) clusters in this segment, so that
        # padding does not change how a sequence is clustered
        c_row = torch.div(nvalid + cluster_size - 1, cluster_size, rounding_mode="floor")
        j = torch.arange(c, device=k.device, dtype=torch.float32)
        pick = first[:, None] + ((j[None, :] + 0.5) * nvalid[:, None] / c_row.clamp(min=1)[:, None])
        pick = pick.long().clamp(max=hi - lo - 1)
        cent = keys.gather(2, pick[:, None, :, None].expand(b, h, c, d))
        alive = (j[None, :] < c_row[:, None])[:, None, :].expand(b, h, c)
        w = vm[:, None, :, None].float()
        for _ in range(iterations):
            lab = assign_nearest(keys, cent, alive, impl=impl)
            members = lab[..., None].expand_as(keys)
            sums = torch.zeros_like(cent).scatter_add_(2, members, keys * w)
            cnt = torch.zeros(b, h, c, device=k.device)
            cnt.scatter_add_(2, lab, w[..., 0].expand_as(lab))
            cent = torch.where(cnt[..., None] > 0, sums / cnt.clamp(min=1)[..., None], cent)
        base = s * per_seg
        cents[:, :, base:base + c] = cent
        sizes[:, :, base:base + c] = cnt.long()
        labels[:, :, lo:hi] = torch.where(vm[:, None, :], lab + base, torch.full_like(lab, -1))
    return cents, labels, sizes


# --- centroid scores ---------------------------------------------------------------------

def centroid_scores_reference(q: Tensor, centroids: Tensor, sizes: Tensor, scale: float) -> Tensor:
    """``scale * q . centroid`` per query head and cluster, ``-inf`` for empty clusters.

    ``q [B, Hq, d]``, ``centroids [B, Hkv, C, d]``, ``sizes [B, Hkv, C]``; returns
    ``[B, Hq, C]`` float32.
    """
    b, hq, d = q.shape
    hkv, c = centroids.shape[1], centroids.shape[2]
    s = torch.einsum("bhgd,bhcd->bhgc", q.float().view(b, hkv, hq // hkv, d), centroids) * scale
    s = torch.where((sizes > 0)[:, :, None, :], s, torch.full_like(s, float("-inf")))
    return s.view(b, hq, c)


def centroid_scores(
    q: Tensor, centroids: Tensor, sizes: Tensor, scale: float, *, impl: str = "auto"
) -> Tensor:
    """Centroid logits; see :func:`centroid_scores_reference`."""
    use_triton(impl, q, centroids)
    return centroid_scores_reference(q, centroids, sizes, scale)
