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
