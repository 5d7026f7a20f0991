"""Benchmarks: decode-attention kernels (``nucleus-attn bench kernels``) against dense SDPA,
measured side by side in one run, with the byte floor of every call."""
