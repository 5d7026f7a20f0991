"""Synthetic decode inputs whose attention is peaked like a real model's.

Random Gaussian queries and keys give nearly uniform attention, on which every sparse
method looks bad and top-p keeps almost everything. Real heads concentrate their mass:
here each key gets a component along its group's query direction with a spread ``spread``
(logits then have a standard deviation of about ``spread``), and a few *planted* keys per
KV head get a large one, like the needle a retrieval head looks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Peaked:
    """q ``[B, Hq, d]``, k/v ``[B, Hkv, N, d]`` and the planted positions ``[B, Hkv, P]``."""

    q: Tensor
    k: Tensor
    v: Tensor
    planted: Tensor


def peaked_qkv(
    batch: int = 1,
    q_heads: int = 8,
    kv_heads: int = 2,
    n: int = 4096,
    d: int = 64,
    *,
    planted: int = 4,
    spread: float = 2.0,
    strength: float = 12.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Peaked:
    """Decode inputs with peaked attention and ``planted`` strong keys per KV head.

    Parameters
    ----------
    spread : float
        Standard deviation of the ordinary keys' logits (larger: more peaked).
    strength : float
        Logit of a planted key, in units of the ordinary keys' standard deviation.
    seed : int
        Seed of a local generator (global RNG state is untouched).
    """
    gen = torch.Generator().manual_seed(seed)
    g = q_heads // kv_heads
    q = torch.randn(batch, kv_heads, g, d, generator=gen)
    direction = q.mean(2)
    direction = direction / direction.norm(dim=-1, keepdim=True)  # [B, Hkv, d]
    # noise orthogonal-ish to the direction keeps ordinary logits near N(0, spread^2)
    noise = torch.randn(batch, kv_heads, n, d, generator=gen) * 0.5
    qn = q.norm(dim=-1).mean(-1)[..., None, None]  # typical query norm per KV head
    coef = torch.randn(batch, kv_heads, n, 1, generator=gen) * spread * d**0.5 / qn
    pos = torch.stack([torch.randperm(n, generator=gen)[:planted] for _ in range(batch * kv_heads)])
    pos = pos.view(batch, kv_heads, planted)
    big = torch.full((batch, kv_heads, planted, 1), strength * spread) * d**0.5 / qn[..., 0:1, :]
    coef.scatter_(2, pos[..., None], big)
    k = noise + coef * direction[:, :, None, :]
    v = torch.randn(batch, kv_heads, n, d, generator=gen)
    cast = dict(dtype=dtype, device=device)
    return Peaked(q.reshape(batch, q_heads, d).to(**cast), k.to(**cast), v.to(**cast),
                  pos.to(device))
