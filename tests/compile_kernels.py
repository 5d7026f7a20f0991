"""Compile every Triton kernel for Hopper (sm_90) on a machine without a GPU.

Run as a script (``python tests/compile_kernels.py``), never inside the interpreter test
session: Triton decides at import whether its library runs compiled or interpreted. Each
op's launcher runs on CPU tensors at the Llama-3-8B decode shape; instead of launching, the
kernel is compiled to a cubin with the argument types and divisibility a real launch would
give it, so launch-configuration and type errors that the interpreter cannot see show up
in CPU CI. Prints one line per kernel variant (registers and spills) and exits non-zero on
the first failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from nucleus_attn import ops  # noqa: E402
from nucleus_attn.ops import (  # noqa: E402
    _dispatch,
    attention,
    clusters,
    pages,
    quant,
    tactic_select,
    topk_split,
    topp,
)
from nucleus_attn.span import KeySpan  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def ptxas_report(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"],
                             capture_output=True, text=True)
    return " | ".join(line.split(":", 1)[-1].strip() for line in res.stderr.splitlines()
                      if "registers" in line or "spill" in line)


def compile_launch(self: _dispatch.LazyKernel, grid: object):
    def launch(*args: object, **kwargs: object) -> None:
        fn = triton.jit(self.fn)
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = dict(zip(fn.arg_names, args, strict=False))
        values.update(kwargs)
        sig, const, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = values[p.name]
            if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
                sig[p.name], const[p.name] = "constexpr", v  # (ints equal to 1 specialise)
                continue
            sig[p.name] = mangle_type(v)
            if hasattr(v, "data_ptr") or (isinstance(v, int) and v % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=TARGET, options=opts)
        shown = {k: v for k, v in const.items() if not isinstance(v, float)}
        print(f"{self.fn.__name__} {opts} {shown}: {ptxas_report(kernel.asm['ptx'])}",
              flush=True)
    return launch


def main() -> int:
    _dispatch.LazyKernel.__getitem__ = compile_launch  # compile instead of launching
    for module in (attention, clusters, pages, quant, topp, tactic_select):  # CPU tensors
        module.use_triton = lambda impl, *tensors: impl != "torch"
    attention.num_sms = lambda device: 132  # an H100
    topk_split.num_sms = lambda device: 132
    b, hkv, g, n, d = 2, 8, 4, 131072, 128
    bf = torch.bfloat16
    q, k = torch.randn(b, hkv * g, d, dtype=bf), torch.randn(b, hkv, n, d, dtype=bf)
    span = KeySpan.full(b, n)
    t = "triton"
    ops.page_minmax(k, span, 16, impl=t)
    kmin = torch.randn(b, hkv, n // 16, d, dtype=bf)
    ops.page_scores(q, kmin, kmin, span, 16, impl=t)
    ops.page_scores(q, kmin, kmin, span, 16, stats=True, scale=0.1, impl=t)
    ops.topk_pages(torch.randn(b, hkv * g, n // 16), hkv, span, 16, 2048, 4, 64, 0.1, impl=t)
    wide = KeySpan.full(4 * b, n)  # more rows than the split kernel takes: the row kernel
    ops.topk_pages(torch.randn(4 * b, hkv * g, n // 16), hkv, wide, 16, 2048, 4, 64, 0.1,
                   impl=t)
    ops.quantize_int4(k, impl=t)
    m = n // 4
    codes, sc = torch.zeros(b, hkv, n, d // 2, dtype=torch.uint8), torch.zeros(b, hkv, n, dtype=bf)
    idx, cnt = torch.zeros(b, hkv, m, dtype=torch.int64), torch.zeros(b, hkv, dtype=torch.int64)
    ops.int4_scores(q, codes, sc, sc, idx, cnt, 0.1, impl=t)
    logits = torch.randn(b, hkv * g, m)
    ops.topp_select(logits, idx, cnt, 0.9, span=span, sink=4, window=64, impl=t)
    ops.topp_select(logits, idx, cnt, 0.9, torch.zeros(b, hkv, m, dtype=torch.bool), impl=t)
    for kw in ({"indices": idx, "counts": cnt}, {}):  # the hot path: index list, range
        est = ops.int4_estimates(q, codes, sc, sc, 0.1, span=span, impl=t, **kw)
        ops.topp_select_estimates(est, 0.9, sink=4, window=64, impl=t)
    ops.gathered_scores(q, k, idx, cnt, 0.1, impl=t)
    for dtype in (bf, torch.float16, torch.float32):
        ops.sparse_attention(q.to(dtype), k.to(dtype), k.to(dtype), idx, cnt, 0.1, impl=t)
    cents = torch.randn(b, hkv, 256, d)
    ops.assign_nearest(k[:, :, :4096], cents, torch.ones(b, hkv, 256, dtype=torch.bool), impl=t)
    sizes = torch.ones(b, hkv, 8192, dtype=torch.int64)
    ops.centroid_scores(q, cents.to(bf), sizes[..., :256], 0.1, impl=t)
    ops.centroid_scores(q, cents, sizes[..., :256], 0.1, impl=t)
    ops.cluster_tokens(sizes, sizes, sizes, torch.zeros(b, hkv, n, dtype=torch.int32), n + 1,
                       impl=t)
    compile_tactic(q, k, span, t)
    return 0


def compile_tactic(q: torch.Tensor, k: torch.Tensor, span: KeySpan, t: str) -> None:
    """Tactic's selection kernels at 128k tokens (N/16 + 3% clusters), with and without the
    spread term, bf16 and float32."""
    b, hkv, n, d = k.shape
    c = n // 16 + 3 * n // 100
    cents = torch.randn(b, hkv, c, d, dtype=k.dtype)
    sizes = torch.ones(b, hkv, c, dtype=torch.int64)
    members = torch.zeros(b, hkv, n, dtype=torch.int32)
    labels = torch.zeros(b, hkv, n, dtype=torch.int64)
    for spread in (torch.rand(b, hkv, c), None):
        r = ops.rank_clusters(q, cents, sizes, spread, 0.1, head_fraction=0.04,
                              sample_positions=(0.1, 0.6), sample_tokens=64, impl=t)
    for dt in (k.dtype, torch.float32):
        m = ops.cluster_lse(q.to(dt), k.to(dt), r, members, sizes, sizes, labels, span,
                            span.ends, 4, 64, 2052, 0.1, impl=t)
    prefix, idx, cnt = ops.tactic_cut(m, r, 0.9, labels, span, span.ends, 4, 64, 2052, impl=t)
    ops.append_clusters(idx, cnt, members, sizes, sizes, r.bins, prefix, impl=t)


if __name__ == "__main__":
    sys.exit(main())
