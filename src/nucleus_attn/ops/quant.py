"""4-bit keys: per-token asymmetric quantization, and estimated scores q.K^ over candidates.

Twilight's pruner needs attention weights of its candidates, but reading their full
keys would cost as much as attending to them. A 4-bit copy of the keys (two codes per
byte plus a scale and a zero per token: +1/8 of the KV memory at d=128) gives estimated
logits at a quarter of the key bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import use_triton

LEVELS = 15  # 4 bits: codes 0..15


# --- quantization ------------------------------------------------------------------------

def quantize_int4_reference(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token asymmetric 4-bit quantization of keys.

    Parameters
    ----------
    k : Tensor
        ``[B, Hkv, N, d]``, d even.

    Returns
    -------
    codes : Tensor
        ``[B, Hkv, N, d // 2]`` uint8; channel 2j in the low nibble, 2j+1 in the high one.
    scale, zero : Tensor
        ``[B, Hkv, N]`` in k's dtype; ``k ~= zero + scale * code``.
    """
    kf = k.float()
    lo, hi = kf.amin(-1), kf.amax(-1)
    # Round the parameters to storage precision first so that dequantization with the
    # stored values is exactly what the codes were chosen for.
    scale = ((hi - lo) / LEVELS).to(k.dtype)
    zero = lo.to(k.dtype)
    step = torch.where(scale.float() > 0, scale.float(), torch.ones_like(lo))
    code = torch.round((kf - zero.float()[..., None]) / step[..., None]).clamp_(0, LEVELS)
    code = code.to(torch.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, scale, zero


def quantize_int4(k: Tensor, *, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """4-bit keys; see :func:`quantize_int4_reference` for the contract."""
    if k.shape[-1] % 2:
        raise ValueError(f"int4 keys need an even head dim, got d={k.shape[-1]}")
    use_triton(impl, k)
    return quantize_int4_reference(k)


def dequantize_int4(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``[..., d]`` float32 keys back from their codes (for tests and diagnostics)."""
    lo = (codes & 0xF).float()
    hi = (codes >> 4).float()
    code = torch.stack((lo, hi), dim=-1).flatten(-2)
    return zero.float()[..., None] + scale.float()[..., None] * code


# --- estimated scores over a candidate set -----------------------------------------------

def int4_scores_reference(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    indices: Tensor,
    counts: Tensor,
    sm_scale: float,
) -> Tensor:
    """Estimated logits ``sm_scale * q . K^`` over each KV head's candidate positions.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]``.
    codes, scale, zero : Tensor
        From :func:`quantize_int4` over the whole cache (``[B, Hkv, N, d // 2]``, ``[B, Hkv, N]``).
    indices : Tensor
        ``[B, Hkv, M]`` int64 candidate positions; the first ``counts`` are live.
    counts : Tensor
        ``[B, Hkv]`` int64.
    sm_scale : float
        Softmax scale (1/sqrt(d) usually).

    Returns
    -------
    Tensor
        ``[B, Hq, M]`` float32; ``-inf`` past ``counts``.
    """
    b, hq, d = q.shape
    hkv, m = indices.shape[1], indices.shape[2]
    # reads per KV head: M * (d/2 + 2 * sizeof(scale)) bytes, once for the whole group
    idx = indices[..., None].expand(b, hkv, m, d // 2)
    kq = dequantize_int4(
        codes.gather(2, idx), scale.gather(2, indices), zero.gather(2, indices)
    )
    qg = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bhmd->bhgm", qg, kq) * sm_scale
    live = (torch.arange(m, device=q.device) < counts[..., None])[:, :, None]
    return torch.where(live, s, torch.full_like(s, float("-inf"))).view(b, hq, m)


def int4_scores(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    indices: Tensor,
    counts: Tensor,
    sm_scale: float,
    *,
    impl: str = "auto",
) -> Tensor:
    """Estimated candidate logits; see :func:`int4_scores_reference` for the contract."""
    use_triton(impl, q, codes)
    return int4_scores_reference(q, codes, scale, zero, indices, counts, sm_scale)
