"""Test session setup.

Triton decides at *import* time whether its own library functions (``tl.sum``, ``tl.max``,
...) run compiled or in its CPU interpreter, so ``TRITON_INTERPRET=1`` must be set before
anything imports triton. On a machine without a CUDA device it is set here, before any
test module is imported; it changes nothing for the torch paths (``impl="auto"`` still
runs the torch references on CPU tensors) and lets the kernel tests run in the
interpreter. On a CUDA machine it is left alone, so that ``tests/gpu`` runs compiled
kernels (the interpreter tests then skip themselves).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    # Triton 3.6's interpreter turns a loop bound into an int with int(array); NumPy 2
    # refuses that for the 1-element arrays it holds scalars in, so `tl.range(start, end)`
    # with run-time bounds fails there (compiled kernels are unaffected). Read the element.
    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:  # no triton: the kernel tests skip themselves
        _interpreter = None
    if _interpreter is not None:
        _patch_tensor = _interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
            _patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__",
                           lambda self: int(self.handle.data.reshape(-1)[0]))

        _interpreter._patch_lang_tensor = _patch_lang_tensor
