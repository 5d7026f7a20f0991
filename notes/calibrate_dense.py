"""Dense calibration of the eval tasks on the bundled SmolLM2-135M model (CPU scratch tool).

Usage (from the repository root):

    PYTHONPATH=src /work/venv/bin/python notes/calibrate_dense.py \
        --tasks passkey multikey --lengths 2048 --n 12 --batch 4 [--set MULTIKEY_NEEDLES=2]

Prints, per task and length, the dense accuracy and seconds per sample, plus each wrong answer.
``--set NAME=VALUE`` overrides a tuning constant of nucleus_attn.eval.tasks (evaluated with
ast.literal_eval) so that formats can be compared without editing the module.
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import torch

from nucleus_attn.eval import tasks as T
from nucleus_attn.models import load_model


def run(model, tok, task: str, length: int, n: int, batch: int, seed: int,
        log) -> tuple[int, float]:
    samples = T.make_samples(task, n, length, tok, seed=seed)
    correct = 0
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        chunk = samples[i:i + batch]
        enc = tok([s.prompt for s in chunk], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=T.max_new_tokens(task), do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for s, text in zip(chunk, texts, strict=True):
            ok = T.score(s, text)
            correct += ok
            ntok = len(tok.encode(s.prompt))
            rec = {"task": task, "length": length, "index": s.index, "depth": s.depth,
                   "tokens": ntok, "answer": s.answer, "generated": text, "ok": ok}
            log.write(json.dumps(rec) + "\n")
            if not ok:
                print(f"   miss idx={s.index} depth={s.depth} tokens={ntok} "
                      f"answer={s.answer!r} got={text!r}", flush=True)
    sec = (time.perf_counter() - t0) / n
    return correct, sec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=list(T.TASKS))
    p.add_argument("--lengths", nargs="+", type=int, default=[2048])
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--log", default="/tmp/calib.jsonl")
    a = p.parse_args()
    for item in a.set:
        name, value = item.split("=", 1)
        if not hasattr(T, name):
            raise SystemExit(f"unknown tuning constant {name}")
        setattr(T, name, ast.literal_eval(value))
    torch.set_num_threads(2)
    t = time.perf_counter()
    model, tok = load_model()
    print(f"load {time.perf_counter() - t:.1f}s  overrides={a.set}", flush=True)
    with open(a.log, "a") as log:
        for length in a.lengths:
            for task in a.tasks:
                c, sec = run(model, tok, task, length, a.n, a.batch, a.seed, log)
                print(f"RESULT task={task} length={length} n={a.n} acc={c}/{a.n}={c / a.n:.2f} "
                      f"s/sample={sec:.1f} overrides={a.set}", flush=True)


if __name__ == "__main__":
    main()
