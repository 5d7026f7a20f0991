"""Launch settings of two decode kernels at 128k context, timed side by side (GPU only).

- the dense range kernel (``ops.dense_attention`` over a span): tile size, splits cap and
  warps, against SDPA without a mask (flash / cuDNN) on the same inputs;
- the top-k pages row kernel (Quest, Twilight's base): warps per row program.

Prints one line per setting with microseconds per call and TB/s where the bytes are known.
Run from the repository root: ``PYTHONPATH=src python3 scripts/tune_decode_kernels.py``
(``--topk-only`` skips the dense part).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nucleus_attn import ops
from nucleus_attn.bench.kernels import time_call
from nucleus_attn.ops import attention, pages
from nucleus_attn.span import KeySpan

DEV = torch.device("cuda")
N, HQ, HKV, D = 131072, 32, 8, 128


def dense(b: int) -> None:
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(b, HQ, D, generator=g, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(b, HKV, N + 64, D, generator=g, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    span = KeySpan(torch.zeros(b, dtype=torch.long, device=DEV),
                   torch.full((b,), N, dtype=torch.long, device=DEV), N + 64)
    nbytes = 2 * b * HKV * N * D * 2
    sdpa = time_call(lambda: F.scaled_dot_product_attention(
        q[:, :, None], k[:, :, :N], v[:, :, :N], enable_gqa=True), DEV, False)
    print(f"B={b} sdpa (no mask, exact length): {sdpa * 1e6:.1f} us, "
          f"{nbytes / sdpa / 1e12:.2f} TB/s")
    base = (attention.DENSE_BLOCK_N, attention.MAX_SPLITS, attention.SPLIT_WARPS)
    for block_n in (32, 64, 128):
        for max_splits in (64, 128):
            for warps in (4, 8):
                attention.DENSE_BLOCK_N, attention.MAX_SPLITS, attention.SPLIT_WARPS = (
                    block_n, max_splits, warps)
                try:
                    sec = time_call(lambda: ops.dense_attention(q, k, v, span, 0.088), DEV, False)
                except Exception as e:  # noqa: BLE001 (a setting that does not compile)
                    print(f"B={b} block_n={block_n} max_splits={max_splits} warps={warps}: {e}")
                    continue
                print(f"B={b} block_n={block_n} max_splits={max_splits} warps={warps}: "
                      f"{sec * 1e6:.1f} us, {nbytes / sec / 1e12:.2f} TB/s")
    attention.DENSE_BLOCK_N, attention.MAX_SPLITS, attention.SPLIT_WARPS = base


def topk(b: int, k_pages: int, p: int = N // 16) -> None:
    g = torch.Generator(device=DEV).manual_seed(1)
    bounds = torch.randn(b, HQ, p, generator=g, device=DEV)
    span = KeySpan.full(b, N, DEV)
    cap = pages.topk_pages_capacity(p, 16, k_pages, 4, 64)
    out = [torch.empty(b, HKV, cap, dtype=t, device=DEV) for t in (torch.int32, torch.int64)]
    counts = torch.empty(b, HKV, dtype=torch.int64, device=DEV)
    for warps in (4, 8, 16, 32):
        def call(w: int = warps) -> None:
            pages._topk_pages_kernel[(b * HKV,)](
                bounds, span.starts, span.ends, out[0], out[1], counts, HKV, p, k_pages, cap,
                0.088, 4, 64, GROUP=HQ // HKV, PAGE=16, BLOCK_P=pages.next_pow2(p),
                num_warps=w)
        sec = time_call(call, DEV, False)
        print(f"topk pages B={b} rows={b * HKV} P={p} k={k_pages} warps={warps}: "
              f"{sec * 1e6:.1f} us")


if __name__ == "__main__":
    import sys

    if "--topk-only" not in sys.argv:
        for b in (1, 4, 8):  # (issue 14: our range kernel >= 0.97x SDPA at 128k x 1 and x 8)
            dense(b)
    for b in (1, 4):
        for k_pages in (82, 2048):
            topk(b, k_pages)
            topk(b, k_pages, N // 16 + 3)  # just past a power of two: a 16384-page block
