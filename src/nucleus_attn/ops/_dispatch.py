"""Choosing between an op's torch reference and its Triton kernel, and launching kernels.

Every public op takes ``impl="auto" | "torch" | "triton"``. ``"auto"`` reads the
environment variable ``NUCLEUS_ATTN_BACKEND`` (``torch`` or ``triton``) and otherwise
runs Triton on CUDA tensors and the torch reference elsewhere. Triton on CPU tensors
needs Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.

Kernels are written as plain functions decorated with :func:`kernel`; they become
``triton.jit`` functions on their first launch, once per mode (compiled or interpreted),
so that ``TRITON_INTERPRET`` is read when a kernel first runs rather than when this
package is imported, and a CPU-only install without triton imports cleanly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

IMPLS = ("auto", "torch", "triton")

try:  # Triton is optional: the torch references need nothing but torch.
    import triton  # noqa: F401
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    tl = None  # type: ignore[assignment]
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


class LazyKernel:
    """A Triton kernel that is ``triton.jit``-ed on first launch, once per mode.

    ``kernel[grid](*args)`` works as for a ``triton.jit`` function. Kernels must not call
    other kernels (a compiled kernel cannot call an interpreted one); code they share is a
    :func:`helper`.
    """

    def __init__(self, fn: Callable[..., Any], do_not_specialize: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.do_not_specialize = do_not_specialize
        self._jitted: dict[bool, Any] = {}
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        mode = interpreting()
        if mode not in self._jitted:
            import triton

            self._jitted[mode] = triton.jit(self.fn, do_not_specialize=self.do_not_specialize
                                            or None)
        return self._jitted[mode][grid]


def kernel(fn: Callable[..., Any] | None = None, *,
           do_not_specialize: tuple[str, ...] = ()) -> Any:
    """Decorator: a Triton kernel compiled (or interpreted) on its first launch.

    ``do_not_specialize`` names int arguments that change from one decode step to the next
    (chunk counts, budgets): Triton would otherwise compile a variant for each of their
    divisibility classes (``% 16``, ``== 1``) as the cache grows.
    """
    if fn is None:
        return lambda f: LazyKernel(f, tuple(do_not_specialize))
    return LazyKernel(fn, tuple(do_not_specialize))


def helper(fn: Callable[..., Any]) -> Any:
    """Decorator: a Triton device function that kernels call (shared code, inlined).

    Unlike a :func:`kernel` it is ``triton.jit``-ed when this package is imported, in the
    mode of that moment, so ``TRITON_INTERPRET`` must be set before importing
    ``nucleus_attn`` to run kernels interpreted (the tests' ``conftest.py`` does).
    """
    if not HAS_TRITON:  # pragma: no cover - installs without triton never call it
        return fn
    import triton

    return triton.jit(fn)


def const(x: Any) -> Any:
    """A module constant that kernels read (Triton wants globals wrapped as constexpr)."""
    return tl.constexpr(x) if tl is not None else x


# --- launch helpers ----------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    """Ceiling division of positive ints."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def dot_block(g: int) -> int:
    """Rows of a ``tl.dot`` operand holding ``g`` query heads (tensor cores need >= 16)."""
    return max(16, next_pow2(g))


def dot_in_f32(*tensors: Tensor) -> bool:
    """Whether ``tl.dot`` operands must be float32 (fp32 inputs, or the CPU interpreter,
    whose 16-bit dot products are wrong in Triton 3.6)."""
    return interpreting() or any(t.dtype == torch.float32 for t in tensors)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 in the interpreter, to keep grids small)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def row_strides(x: Tensor) -> tuple[int, int, int]:
    """Strides (batch, head, position) of a ``[B, H, N, d]`` tensor whose last dim is dense."""
    return x.stride(0), x.stride(1), x.stride(2)


def last_dim_dense(x: Tensor) -> Tensor:
    """``x`` itself when its last dimension is contiguous, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


# --- a producer's workspace, handed to its consumer ---------------------------------------

@dataclass(frozen=True)
class HandsWorkspace:
    """Base of statistics a producer kernel hands to its consumer (``Estimates``,
    ``PageStats``): ``workspace`` holds the consumer's int32 counters, zeroed inside the
    producer's own launch (one memset launch saved); it can be taken once only, since the
    consumer leaves it dirty."""

    workspace: Tensor | None = field(default=None, repr=False, compare=False, kw_only=True)
    _taken: list[bool] = field(default_factory=lambda: [False], repr=False, compare=False,
                               kw_only=True)

    def take_workspace(self, numel: int) -> Tensor | None:
        """The producer's zeroed workspace, once, if it has ``numel`` elements."""
        ws = self.workspace
        if ws is None or self._taken[0] or ws.numel() != numel:
            return None
        self._taken[0] = True
        return ws
