"""Driver for Nsight Compute: one eager Twilight decode step (dense base, p=0.9) on the
kernel benchmark's inputs, between ``cudaProfilerStart``/``Stop`` so that only its kernels
are profiled (a warm-up step compiles them first). Run under ncu from the repository root:

``ncu --profile-from-start off --clock-control none --section SpeedOfLight --section
Occupancy --section LaunchStats --section WarpStateStats --csv --page details
python3 scripts/ncu_twilight.py N B [base]``
"""

from __future__ import annotations

import math
import sys

import torch

from nucleus_attn.bench.kernels import LLAMA3_8B, SPREAD, peaked_inputs
from nucleus_attn.decode import decode_step, new_state
from nucleus_attn.methods import make_config
from nucleus_attn.span import KeySpan


def main() -> None:
    n, b = int(sys.argv[1]), int(sys.argv[2])
    base = sys.argv[3] if len(sys.argv) > 3 else "dense"
    dev = torch.device("cuda")
    q, k, v = peaked_inputs(b, LLAMA3_8B, n, SPREAD, 0, dev)
    span = KeySpan.full(b, n, dev)
    cfg = make_config("twilight", p=0.9, base=base, dense_below=0)
    st = new_state(cfg, k, span)
    scale = 1.0 / math.sqrt(LLAMA3_8B.d)
    decode_step(q, k, v, cfg, st, span, scale, padded=False)  # compile
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    decode_step(q, k, v, cfg, st, span, scale, padded=False)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
