"""One torchrun worker of tests/test_tp.py: sparse decode under transformers' tensor parallelism.

Run as ``torchrun --nproc-per-node 2 tests/tp_worker.py EVEN UNEVEN OUT.json`` (not a pytest
module: the name does not match ``test_*.py``). ``EVEN`` is a checkpoint whose head counts
divide by the world size, ``UNEVEN`` one whose KV heads do not.

Every rank loads ``EVEN`` with the TP plan and generates greedily, plain and under
:func:`nucleus_attn.enable` for each case; rank 0 also runs the same checkpoint loaded on
one process (the reference). The per-head statistics of all ranks are gathered, so the
reference compares with the whole model. Then every rank loads ``UNEVEN`` with the TP plan
and calls ``enable``, which must refuse it. Rank 0 writes everything to ``OUT.json``;
test_tp.py asserts on it, so that a failure reads as a comparison, not a crashed launch.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from method_cases import METHOD_CASES
from transformers import AutoModelForCausalLM

import nucleus_attn as na
from nucleus_attn.integrations.tp import load_tensor_parallel, tp_world_size

PROMPT_TOKENS = 160
NEW_TOKENS = 8
# p = 0.9 with small bases, sinks and windows: selection drops keys on a 160-token prompt
SPARSE_CASES: dict[str, dict[str, Any]] = {
    "oracle-topp": {"p": 0.9},
    "twilight": {"p": 0.9, "base_budget": 0.5, "page_size": 8, "sink": 2, "window": 4},
    "tactic": {"p": 0.9, "cluster_size": 8, "iterations": 3, "sink": 2, "window": 4},
}


def cases() -> list[tuple[str, str | None, dict[str, Any]]]:
    """(label, method or None for the plain model, parameters) of every run."""
    out: list[tuple[str, str | None, dict[str, Any]]] = [("plain", None, {})]
    out += [(f"full/{m}", m, METHOD_CASES[m]["full"]) for m in na.methods()]
    out += [(f"sparse/{m}", m, params) for m, params in SPARSE_CASES.items()]
    return out


def generate(model: Any, ids: torch.Tensor, method: str | None,
             params: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens, the logits of each step and the layers' kept-token statistics."""
    handle = na.enable(model, method, dense_layers=0, **params) if method else None
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        if handle is not None:
            handle.disable()
    result: dict[str, Any] = {
        "tokens": out.sequences[0, ids.shape[1]:].tolist(),
        "logits": torch.stack(out.logits).float(),
        "kept_tokens": None, "kept_fraction_per_head": None, "decode_rows": None,
    }
    if handle is not None:
        summary = handle.summary()
        layers = summary["per_layer"]
        result["decode_rows"] = summary["decode_rows"]
        result["kept_tokens"] = [d["mean_kept_tokens"] for d in layers]
        result["kept_fraction_per_head"] = [d["kept_fraction_per_head"] for d in layers]
    return result


def gather_heads(result: dict[str, Any]) -> dict[str, Any]:
    """All ranks' statistics: heads concatenated in rank order, means over the ranks.

    Every rank holds the same number of KV heads, so the model-wide mean kept count per
    head of a layer is the mean of the ranks' means.
    """
    local = (result["kept_tokens"], result["kept_fraction_per_head"])
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, local)
    if local[0] is None:
        return result
    n_layers = len(local[0])
    return {
        **result,
        "local_kv_heads": [len(h) if h else None for h in local[1]],
        "kept_tokens": [
            None if any(r[0][i] is None for r in ranks)
            else sum(r[0][i] for r in ranks) / len(ranks)
            for i in range(n_layers)
        ],
        "kept_fraction_per_head": [
            None if any(r[1][i] is None for r in ranks) else [x for r in ranks for x in r[1][i]]
            for i in range(n_layers)
        ],
    }


def uneven_error(path: str) -> dict[str, Any]:
    """Load the uneven checkpoint with the TP plan and report what ``enable`` says."""
    model = load_tensor_parallel(path, dtype=torch.float32).eval()
    report: dict[str, Any] = {"loaded": True, "tp_size": tp_world_size(model), "error": None}
    try:
        na.enable(model, "twilight", dense_layers=0).disable()
    except ValueError as exc:
        report.update(error=str(exc), type=type(exc).__name__)
    return report


def main(even: str, uneven: str, out_path: str) -> None:
    torch.set_num_threads(1)
    model = load_tensor_parallel(even, dtype=torch.float32).eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = (AutoModelForCausalLM.from_pretrained(even, dtype=torch.float32).eval()
                 if rank == 0 else None)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(7))
    runs: dict[str, Any] = {}
    for label, method, params in cases():
        tp = gather_heads(generate(model, ids, method, params))
        if reference is None:
            continue
        ref = generate(reference, ids, method, params)
        runs[label] = {
            "tp_tokens": tp["tokens"], "ref_tokens": ref["tokens"],
            "max_logit_diff": (tp["logits"] - ref["logits"]).abs().max().item(),
            "decode_rows": tp["decode_rows"], "local_kv_heads": tp.get("local_kv_heads"),
            "tp_kept_tokens": tp["kept_tokens"], "ref_kept_tokens": ref["kept_tokens"],
            "tp_kept_fraction_per_head": tp["kept_fraction_per_head"],
            "ref_kept_fraction_per_head": ref["kept_fraction_per_head"],
        }
    report = {"world_size": world, "tp_size": tp_world_size(model),
              "ref_tp_size": tp_world_size(reference) if reference is not None else None,
              "runs": runs, "uneven": uneven_error(uneven)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
