"""nucleus_attn.enable on a model split with transformers' tensor parallelism (2 gloo ranks).

One ``torchrun --nproc-per-node 2`` launch (tests/tp_worker.py) runs every case: a tiny
random Llama with 8 query and 4 KV heads, loaded with ``tp_plan="auto"``, so that each rank
holds 2 whole KV heads and their query groups; rank 0 compares with the same checkpoint
loaded on one process. At p = 1 / full budget every method gives the single-process
tokens and logits; at p = 0.9 the kept counts per head match (the all-reduce sums in
another order, which may move a token across the threshold, nothing more).

Uneven heads: transformers 5.24 *loads* a Llama with 3 KV heads on 2 ranks without a word
(``ColwiseParallel`` gives the last rank a shorter slice, cutting a head in two) and its
first forward then fails in ``k_proj(...).view(...)`` with ``shape '[1, 37, -1, 16]' is
invalid``. ``enable`` refuses such a model first, naming the head counts and the fix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import nucleus_attn as na

transformers = pytest.importorskip("transformers")

from nucleus_attn.integrations.tp import check_tensor_parallel, tp_world_size  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORKER = Path(__file__).with_name("tp_worker.py")
SPARSE = ("oracle-topp", "twilight", "tactic")  # run at p = 0.9 by the worker
LOGIT_TOL = 1e-4
KEPT_RTOL = 0.01
LAUNCH_TIMEOUT_S = 300


def save_llama(path: Path, kv_heads: int, q_heads: int, head_dim: int = 16) -> str:
    """A tiny random-weight fp32 Llama checkpoint (2 layers, vocab 256)."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=q_heads * head_dim, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=512, initializer_range=0.1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The worker's JSON report: one torchrun launch for every test of this module."""
    tmp = tmp_path_factory.mktemp("tp")
    even = save_llama(tmp / "even", kv_heads=4, q_heads=8)
    uneven = save_llama(tmp / "uneven", kv_heads=3, q_heads=6)
    out = tmp / "report.json"
    src = str(Path(na.__file__).resolve().parents[1])
    # CPU and gloo on any machine: with a visible GPU transformers would pick NCCL
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(WORKER), even, uneven, str(out)]
    # a session of its own, so that a hung launch is ended with its workers
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun ran past {LAUNCH_TIMEOUT_S} s\n--- stderr\n{stderr[-8000:]}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun exited with {proc.returncode}\n--- stdout\n{stdout[-4000:]}"
                    f"\n--- stderr\n{stderr[-8000:]}")
    return json.loads(out.read_text())


def test_model_is_split_over_two_ranks(report):
    assert report["world_size"] == 2 and report["tp_size"] == 2
    assert report["ref_tp_size"] == 1
    # the attention function sees its rank's heads only: 4 KV heads -> 2 per rank
    run = report["runs"]["sparse/twilight"]
    assert run["local_kv_heads"] == [2, 2]
    assert all(len(h) == 4 for h in run["tp_kept_fraction_per_head"])


@pytest.mark.parametrize("label", ["plain", *(f"full/{m}" for m in na.methods())])
def test_full_budget_matches_single_process(report, label):
    run = report["runs"][label]
    assert run["tp_tokens"] == run["ref_tokens"], f"{label}: greedy tokens differ under TP"
    assert run["max_logit_diff"] <= LOGIT_TOL, f"{label}: logits differ by {run['max_logit_diff']}"
    if label != "plain":
        assert run["decode_rows"] == 7


@pytest.mark.parametrize("method", SPARSE)
def test_sparse_kept_counts_match_single_process(report, method):
    run = report["runs"][f"sparse/{method}"]
    for layer, (tp, ref) in enumerate(zip(run["tp_kept_tokens"], run["ref_kept_tokens"],
                                          strict=True)):
        assert ref is not None and tp == pytest.approx(ref, rel=KEPT_RTOL), (
            f"{method} layer {layer}: {tp:.2f} kept tokens per head under TP, {ref:.2f} alone")
    per_head = zip(run["tp_kept_fraction_per_head"], run["ref_kept_fraction_per_head"],
                   strict=True)
    for layer, (tp, ref) in enumerate(per_head):
        # heads in rank order are the model's heads: each rank selects for its own
        assert tp == pytest.approx(ref, abs=KEPT_RTOL), f"{method} layer {layer} per head"
    fractions = [f for heads in run["ref_kept_fraction_per_head"] for f in heads]
    assert max(fractions) < 1.0, f"{method} at p=0.9 kept every token: not a sparse test"


def test_uneven_heads_clear_error(report):
    uneven = report["uneven"]
    assert uneven["loaded"] and uneven["tp_size"] == 2  # transformers loads it silently
    assert uneven["type"] == "ValueError"
    message = uneven["error"]
    assert "num_key_value_heads=3" in message and "not divisible by 2" in message
    assert "--nproc-per-node 3" in message and "one device" in message


# --- without a launch -----------------------------------------------------------------------

def fake_tp_model(kv_heads: int, q_heads: int, world: int) -> SimpleNamespace:
    config = SimpleNamespace(num_key_value_heads=kv_heads, num_attention_heads=q_heads)
    return SimpleNamespace(config=config, _tp_size=world)


def test_one_device_model_is_not_tensor_parallel():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    assert tp_world_size(model) == 1
    check_tensor_parallel(model)  # one device: any head count


def test_check_names_the_heads_and_the_fix():
    check_tensor_parallel(fake_tp_model(4, 8, 2))
    check_tensor_parallel(fake_tp_model(3, 9, 3))
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 and num_attention_heads=9 is "
                                         r"not divisible by 2.*--nproc-per-node 3"):
        check_tensor_parallel(fake_tp_model(3, 9, 2))  # SmolLM2-135M's heads
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 is not divisible by 4"
                                         r".*--nproc-per-node 2\), or load the model"):
        check_tensor_parallel(fake_tp_model(2, 8, 4))
    with pytest.raises(ValueError, match="without tp_plan"):
        check_tensor_parallel(fake_tp_model(1, 7, 2))  # no world size > 1 divides both
