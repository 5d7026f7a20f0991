"""Choosing between an op's torch reference and its Triton kernel.

Every public op takes ``impl="auto" | "torch" | "triton"``. ``"auto"`` reads the
environment variable ``NUCLEUS_ATTN_BACKEND`` (``torch`` or ``triton``) and otherwise
runs Triton on CUDA tensors and the torch reference elsewhere. Triton on CPU tensors
needs Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
"""

from __future__ import annotations

import os

from torch import Tensor

IMPLS = ("auto", "torch", "triton")

try:  # Triton is optional: the torch references need nothing but torch.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, *tensors: Tensor) -> bool:
    """Decide whether an op runs its Triton kernel; raise if the asked path cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        env = os.environ.get("NUCLEUS_ATTN_BACKEND", "").strip().lower()
        if env in ("torch", "triton"):
            impl = env
        elif env:
            raise ValueError(
                f"NUCLEUS_ATTN_BACKEND={env!r} is not understood; set it to 'torch' or 'triton' "
                "or unset it"
            )
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "torch":
        return False
    if impl == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise ValueError("the Triton path was asked for but triton is not installed: "
                         "pip install triton==3.6.0")
    if not on_cuda and not interpreting():
        raise ValueError(
            "the Triton path was asked for on CPU tensors; move the tensors to a CUDA device, "
            "set TRITON_INTERPRET=1 to run Triton's interpreter, or use impl='torch'"
        )
    return True
