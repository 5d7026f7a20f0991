"""One sparse decode step: choose the keys each KV head attends to, then attend exactly.

``sparse_decode`` is the checked entry point on raw tensors (it builds the method's
metadata on the fly); ``decode_step`` is the unchecked hot path the model integration
calls per layer with metadata it keeps up to date.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import ops
from .crossover import dense_below
from .methods import MethodConfig, MethodState, Selection, make_config, spec_of
from .span import KeySpan


@dataclass(frozen=True)
class DecodeInfo:
    """What a decode step kept.

    Attributes
    ----------
    kept : Tensor
        ``[B, Hkv]`` int64 tokens attended to per KV head.
    candidates : Tensor
        ``[B, Hkv]`` int64 tokens the method's selector proposed before pruning.
    lengths : Tensor
        ``[B]`` int64 valid tokens per sequence (the denominator of kept fractions).
    mass : Tensor or None
        ``[B, Hq]`` float32 exact softmax mass of the kept set per query head
        (``diagnostics=True`` only).
    indices : Tensor or None
        ``[B, Hkv, M]`` int64 kept positions, first ``kept`` live; None when every valid
        key was kept.
    """

    kept: Tensor
    candidates: Tensor
    lengths: Tensor
    mass: Tensor | None = None
    indices: Tensor | None = None

    @property
    def kept_fraction(self) -> Tensor:
        """``[B, Hkv]`` float32 kept / valid tokens."""
        return self.kept.float() / self.lengths[:, None].float()

    def kept_mask(self, n: int) -> Tensor:
        """``[B, Hkv, N]`` bool mask of the kept positions."""
        if self.indices is None:
            b, h = self.kept.shape
            pos = torch.arange(n, device=self.kept.device)
            return (pos < self.lengths[:, None]).view(b, 1, n).expand(b, h, n).clone()
        return ops.indices_to_mask(self.indices, self.kept, n)


def new_state(cfg: MethodConfig, k: Tensor, span: KeySpan) -> MethodState | None:
    """The method's per-sequence metadata built from the keys (None if it needs none)."""
    spec = spec_of(cfg)
    return None if spec.new_state is None else spec.new_state(k, span, cfg)


def kept_mass(q: Tensor, k: Tensor, span: KeySpan, sel: Selection, scale: float) -> Tensor:
    """``[B, Hq]`` exact softmax mass of the selection per query head (diagnostics)."""
    b, hq, _ = q.shape
    hkv = k.shape[1]
    if sel.indices is None:
        return torch.ones(b, hq, device=q.device)
    from .methods.oracle import exact_logits

    probs = torch.softmax(exact_logits(q, k, span, scale), dim=-1)
    mask = ops.indices_to_mask(sel.indices, sel.counts, k.shape[2])
    return (probs * mask.repeat_interleave(hq // hkv, dim=1)).sum(-1)


def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cfg: MethodConfig,
    state: MethodState | None,
    span: KeySpan,
    scale: float,
    *,
    padded: bool = True,
    diagnostics: bool = False,
) -> tuple[Tensor, DecodeInfo]:
    """Select and attend, without input checks (the per-layer hot path).

    ``padded=False`` promises that every position is valid, which lets dense steps skip
    the mask. Below the method's crossover length (``cfg.dense_below``, see
    :mod:`nucleus_attn.crossover`) the step is dense attention: N is the cache length, a
    Python int, so the choice needs no host sync.
    """
    if k.shape[2] < dense_below(cfg, q.device, diagnostics, q.shape[0]):
        sel = Selection.everything(span, k.shape[1])
    else:
        sel = spec_of(cfg).select(q, k, state, span, cfg, scale)
    if sel.indices is None:
        out = ops.dense_attention(q, k, v, span if padded else None, scale)
    else:
        out = ops.sparse_attention(q, k, v, sel.indices, sel.counts, scale)
    mass = kept_mass(q, k, span, sel, scale) if diagnostics else None
    info = DecodeInfo(sel.counts, sel.candidates, span.lengths, mass, sel.indices)
    return out, info


#: The dtypes ``sparse_decode`` accepts (those of the kernels).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None) -> KeySpan:
    for name, t, dims, shape in (("q", q, 3, "(B, Hq, d)"), ("k", k, 4, "(B, Hkv, N, d)"),
                                 ("v", v, 4, "(B, Hkv, N, d)")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t)}")
        if t.dim() != dims:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}; "
                            f"cast it, e.g. {name}.float() (the kernels have no other dtype)")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise TypeError(f"q, k and v must have one dtype, got q {q.dtype}, k {k.dtype}, v "
                        f"{v.dtype}; cast them to the cache's, e.g. q.to(k.dtype)")
    b, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    kb, hkv, n, kd = k.shape
    if kb != b:
        raise ValueError(f"batch size differs: q has B={b}, k/v have B={kb}")
    if kd != d:
        raise ValueError(f"head dim differs: q has d={d}, k/v have d={kd}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"query heads Hq={hq} must be a multiple of KV heads Hkv={hkv} (GQA); check that "
            "q is (B, Hq, d) and k is (B, Hkv, N, d)"
        )
    if n == 0:
        raise ValueError("the KV cache is empty (N=0); decode needs at least one key")
    if len({q.device, k.device, v.device}) > 1:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; check the model's activations "
                             "(an fp16 overflow is a common cause: try bfloat16)")
    if lengths is None:
        return KeySpan.full(b, n, q.device)
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.shape != (b,) or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer tensor of shape ({b},), got "
                         f"{tuple(lengths.shape)} {lengths.dtype}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > n:
        raise ValueError(f"lengths must be in [1, N={n}] (valid keys per sequence), got values "
                         f"in [{lo}, {hi}]")
    return KeySpan.from_lengths(lengths.to(q.device), n)


def sparse_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    method: str | MethodConfig = "dense",
    *,
    lengths: Tensor | None = None,
    scale: float | None = None,
    diagnostics: bool = False,
    **params: Any,
) -> tuple[Tensor, DecodeInfo]:
    """Attention output of one decode step under a sparse method.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, d]`` queries of the new token; float16, bfloat16 or float32, the dtype
        of ``k`` and ``v``.
    k, v : Tensor
        ``[B, Hkv, N, d]`` the KV cache (``Hq % Hkv == 0``; GQA shares one selection per
        KV head among its query heads).
    method : str or MethodConfig
        A registered name (see :func:`nucleus_attn.methods`) or a config object such as
        ``Twilight(p=0.9)``. Default ``"dense"``.
    lengths : Tensor, optional
        ``[B]`` valid lengths for ragged batches: keys at positions ``>= lengths[b]`` do
        not exist. Default: all N.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(d)``.
    diagnostics : bool
        Also compute the exact attention mass of the kept set (``info.mass``).
    **params
        Method parameters when ``method`` is a name (e.g. ``p=0.8``), or overrides of a
        config's fields.

    Returns
    -------
    out : Tensor
        ``[B, Hq, d]``, q's dtype.
    info : DecodeInfo
        Kept and candidate token counts per KV head (and the kept mass).

    Examples
    --------
    >>> import torch, nucleus_attn as na
    >>> q, k = torch.randn(1, 8, 64), torch.randn(1, 2, 1000, 64)
    >>> out, info = na.sparse_decode(q, k, k, method="twilight", p=0.9)
    >>> out.shape, info.kept.shape
    (torch.Size([1, 8, 64]), torch.Size([1, 2]))
    """
    cfg = make_config(method, **params)
    span = _check_inputs(q, k, v, lengths)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    state = new_state(cfg, k, span)
    return decode_step(q, k, v, cfg, state, span, scale, padded=lengths is not None,
                       diagnostics=diagnostics)
