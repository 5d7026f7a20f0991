"""Offline evaluation data for nucleus-attn.

Why this subpackage exists: sparse decode attention must be judged against dense attention on
tasks where the answer sits somewhere in a long context. Everything here is generated locally
and deterministically (no downloads), so a study can be rerun bit-for-bit from a seed.

Modules
-------
tasks
    Synthetic long-context retrieval tasks (passkey, multikey, multivalue, kv, vartrack).
perplexity
    Held-out text from the Python standard library and windows for perplexity measurements.
candidates
    Candidate quality of Twilight's bases: how much of the attention that matters each
    candidate selector proposes, per layer and head (``nucleus-attn eval --candidates``).
"""
