"""``nucleus-attn eval``: accuracy-vs-budget sweeps on offline long-context tasks.

For each task and context length, dense attention runs first; a (task, length) cell where
dense scores under ``--min-dense-accuracy`` is reported and not swept (a 135M model cannot
answer every task at every length, and a method cannot be judged where dense fails).
Every row goes to ``rows.jsonl`` as soon as it is done, so an interrupted sweep resumes;
the markdown report and the plots are rebuilt from all rows at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..cliargs import add_methods_argument
from ..methods import MethodConfig, describe, make_config, parse_sweep
from . import report
from .store import RowStore

DEFAULT_SWEEP = (
    "oracle-topp:p=0.8,0.9,0.95",
    "streaming:window=64,256,1024",
    "quest:budget=64,128,256,512,1024",
    "twilight:p=0.8,0.9,0.95,0.99",
    "tactic:p=0.8,0.9,0.95",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF model dir, .gguf file, or 'bundled' (default: the bundled "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task kinds (default: all of nucleus_attn.eval.tasks.TASKS)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048],
                        help="context lengths in tokens (default 2048; the study uses "
                             "2048 4096 8192)")
    parser.add_argument("--samples", type=int, default=20,
                        help="samples per task and length (default 20; the study uses 100)")
    add_methods_argument(parser, metavar="NAME:k=v1,v2,...",
                         help="method sweeps; dense always runs first (default: "
                              + " ".join(DEFAULT_SWEEP) + ")")
    parser.add_argument("--dense-layers", type=int, default=2,
                        help="first layers kept dense (default 2)")
    parser.add_argument("--min-dense-accuracy", type=float, default=0.8,
                        help="sweep a (task, length) only where dense reaches this accuracy "
                             "(default 0.8)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    parser.add_argument("--perplexity", action="store_true",
                        help="also measure perplexity on held-out text (stdlib sources)")
    parser.add_argument("--ppl-prefix", type=int, default=4096,
                        help="perplexity prefix tokens (default 4096)")
    parser.add_argument("--ppl-tokens", type=int, default=64,
                        help="continuation tokens scored per window (default 64)")
    parser.add_argument("--ppl-windows", type=int, default=4,
                        help="perplexity windows (default 4)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--out", type=Path, default=Path("results/eval"),
                        help="output folder: rows.jsonl, report.md, PNGs (default results/eval)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild report.md and the plots from rows.jsonl, run nothing")
    parser.add_argument("--candidates", action="store_true",
                        help="also run the candidate-quality study of Twilight's bases "
                             "(nucleus_attn.eval.candidates) on each batch's dense prefill: "
                             "rows to candidates_rows.jsonl, summary candidates.json/.md/.png")
    parser.add_argument("--candidates-only", action="store_true",
                        help="run only the candidate-quality study (prefill and one captured "
                             "step per batch, no method decoding)")
    parser.add_argument("--candidate-budgets", nargs="+", type=float, default=[0.10, 0.25],
                        help="candidate budgets, fractions of N (default 0.10 0.25)")


def _configs(specs: list[str]) -> list[MethodConfig]:
    seen: dict[str, MethodConfig] = {"dense": make_config("dense")}
    for spec in specs:
        for cfg in parse_sweep(spec):
            seen.setdefault(describe(cfg), cfg)
    return list(seen.values())


def write_report(store: RowStore, out: Path, command: str) -> list[Path]:
    """``report.md``, ``accuracy_vs_kept.png`` and ``kept_heatmap.png`` from all rows."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    runs = [r for r in store.rows if r.get("kind") == "run"]
    md = ["# nucleus-attn eval", ""]
    md += [f"Sweep: `{r['command']}` ({r['env']})" for r in runs] or [
        "Sweep commands: see the README beside this file."]
    md += ["", f"Report built with: `{command}`", "",
          "Accuracy is % correct (greedy); kept % is the mean kept fraction of tokens over "
          "the sparse layers (first layers dense), with its spread (std) over layers and KV "
          "heads; mass is the exact softmax mass kept, mean and lowest per-head mean.", ""]
    dropped = [r for r in store.rows if r.get("kind") == "dropped"]
    if dropped:
        md += ["Not swept (dense below the threshold): " + ", ".join(
            f"{r['task']}@{r['length']} (dense {100 * r['accuracy']:.0f}%)" for r in dropped),
            ""]
    md.append(report.markdown(store.rows))
    (out / "report.md").write_text("\n".join(md))
    written.append(out / "report.md")
    if report.task_rows(store.rows):
        written.append(report.plot_accuracy(store.rows, out / "accuracy_vs_kept.png"))
        heat = report.plot_heatmaps(store.rows, out / "kept_heatmap.png")
        if heat:
            written.append(heat)
    return written


def _row(cfg: MethodConfig, stats: Any, **extra: Any) -> dict[str, Any]:
    row = {"method": describe(cfg), "name": cfg.name, "params": dict(vars(cfg))}
    row.update(extra)
    row.update(stats.as_row())
    return row


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from rich.console import Console
    from rich.progress import Progress

    from ..models import load_model
    from . import tasks as task_lib
    from .runner import run_cells

    console = Console()
    command = "nucleus-attn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    store = RowStore(args.out / "rows.jsonl")
    study = None
    if args.candidates or args.candidates_only:
        from .candidates import CandidateRows, StudyConfig

        for f in args.candidate_budgets:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"--candidate-budgets {f} must be fractions of N in (0, 1]")
        study = (CandidateRows(args.out / "candidates_rows.jsonl"),
                 StudyConfig(budgets=tuple(args.candidate_budgets),
                             dense_layers=args.dense_layers))
    if args.report_only:
        for path in write_report(store, args.out, command):
            console.print(f"wrote {path}")
        if study is not None and study[0].rows:
            for path in _write_candidates(study, store, args.out, command):
                console.print(f"wrote {path}")
        return 0
    if not 0.0 <= args.min_dense_accuracy <= 1.0:
        raise ValueError(f"--min-dense-accuracy={args.min_dense_accuracy} must be in [0, 1]")
    names = args.tasks or list(task_lib.TASKS)
    for name in names:
        task_lib.max_new_tokens(name)  # unknown task -> ValueError listing the known ones
    configs = _configs(args.methods or list(DEFAULT_SWEEP))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    env = (f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {dtype}, "
           f"python {sys.version.split()[0]}, torch {torch.__version__}")
    store.add({"kind": "run", "command": command, "env": env})
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=dtype, device=device)
    tok.padding_side = "left"
    console.print(f"model loaded in {time.perf_counter() - t0:.1f} s on {device} ({dtype}); "
                  f"{len(configs)} method settings, tasks {names}, lengths {args.lengths}")

    with Progress(console=console) as progress:
        for length in args.lengths:
            for name in names:
                key = {"kind": "task", "task": name, "length": length, "seed": args.seed,
                       "samples_asked": args.samples}
                todo = [c for c in configs if not store.has(**key, method=describe(c))]
                if args.candidates_only:
                    todo = []
                want_study = study is not None and not all(
                    study[0].has(name, length, args.seed, i) for i in range(args.samples))
                if store.has(**{**key, "kind": "dropped", "method": "dense"}) or not (
                        todo or want_study):
                    continue
                samples = task_lib.make_samples(name, args.samples, length, tok, seed=args.seed)
                prompts = [s.prompt for s in samples]
                new = task_lib.max_new_tokens(name)
                hook = _study_hook(study, samples, model, tok, console) if want_study else None

                def judge(i: int, text: str, samples: list = samples) -> bool:
                    return task_lib.score(samples[i], text)

                if args.candidates_only:
                    bar = progress.add_task(f"{name}@{length}: candidates",
                                            total=math.ceil(len(prompts) / args.batch_size))
                    _study_only(study, samples, model, tok, args.batch_size, hook,
                                lambda bar=bar: progress.advance(bar))
                    progress.remove_task(bar)
                    continue
                # dense first, alone, so that a cell where dense fails is not swept; with
                # --min-dense-accuracy 0 nothing is dropped and one prefill serves them all
                if args.min_dense_accuracy > 0:
                    stages = [[c for c in todo if c.name == "dense"],
                              [c for c in todo if c.name != "dense"]]
                else:
                    stages = [todo]
                for stage in filter(None, stages or [[]]):
                    bar = progress.add_task(f"{name}@{length}: {len(stage)} settings",
                                            total=math.ceil(len(prompts) / args.batch_size))
                    cells = run_cells(model, tok, prompts, new, stage,
                                      dense_layers=args.dense_layers,
                                      batch_size=args.batch_size, judge=judge,
                                      on_batch=lambda bar=bar: progress.advance(bar),
                                      on_prefill=hook)
                    hook = None  # the study needs one prefill per batch
                    progress.remove_task(bar)
                    for cfg in stage:
                        correct, stats, secs = cells[describe(cfg)]
                        row = _row(cfg, stats, **key, samples=len(prompts),
                                   correct=correct, accuracy=correct / len(prompts),
                                   seconds=secs)
                        store.add(row)
                        console.print(f"{name}@{length} {row['method']}: "
                                      f"{100 * row['accuracy']:.0f}% correct, kept "
                                      f"{100 * row['kept_fraction']:.2f}%, mass "
                                      f"{row['mass']:.4f}")
                    dense_row = next(r for r in store.rows if r.get("kind") == "task" and
                                     r["task"] == name and r["length"] == length and
                                     r["name"] == "dense" and r["seed"] == args.seed and
                                     r["samples_asked"] == args.samples)
                    if dense_row["accuracy"] < args.min_dense_accuracy:
                        store.add({**key, "kind": "dropped", "method": "dense",
                                   "accuracy": dense_row["accuracy"]})
                        console.print(f"[yellow]{name}@{length}: dense scores "
                                      f"{100 * dense_row['accuracy']:.0f}% < "
                                      f"{100 * args.min_dense_accuracy:.0f}%: not swept")
                        break

        if args.perplexity:
            _perplexity(args, model, tok, configs, store, progress, console)

    for path in write_report(store, args.out, command):
        console.print(f"wrote {path}")
    if study is not None and study[0].rows:
        for path in _write_candidates(study, store, args.out, command):
            console.print(f"wrote {path}")
    return 0


def _study_hook(study: tuple[Any, Any], samples: list, model: Any, tok: Any,
                console: Any) -> Callable[[int, torch.Tensor, torch.Tensor, Any], None]:
    """An ``on_prefill`` hook: the candidate study on each batch not yet measured."""
    from .candidates import needle_positions, study_batch

    rows, cfg = study

    def hook(start: int, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> None:
        chunk = samples[start:start + ids.shape[0]]
        if all(rows.has(s.task, s.length, s.seed, s.index) for s in chunk):
            return
        needles = [needle_positions(tok, s.prompt, s.answer) for s in chunk]
        t0 = time.perf_counter()
        for s, res in zip(chunk, study_batch(model, cache, ids, mask, needles, cfg),
                          strict=True):
            if not rows.has(s.task, s.length, s.seed, s.index):
                rows.add({"task": s.task, "length": s.length, "seed": s.seed,
                          "index": s.index, "depth": s.depth, **res})
        console.print(f"candidates {chunk[0].task}@{chunk[0].length} samples {start}.."
                      f"{start + len(chunk) - 1}: {time.perf_counter() - t0:.1f} s")

    return hook


def _study_only(study: tuple[Any, Any], samples: list, model: Any, tok: Any,
                batch_size: int, hook: Callable[..., None], advance: Callable[[], Any]) -> None:
    """The candidate study alone: per batch not yet measured, a prefill and the hook."""
    from .runner import prefill

    device = next(model.parameters()).device
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        if not all(study[0].has(s.task, s.length, s.seed, s.index) for s in chunk):
            enc = tok([s.prompt for s in chunk], return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            hook(start, ids, mask, prefill(model, ids, mask))
        advance()


def _write_candidates(study: tuple[Any, Any], store: RowStore, out: Path,
                      command: str) -> list[Path]:
    """The study's summary, naming every sweep command that added rows to this folder."""
    from .candidates import write

    rows, cfg = study
    sweeps = [r["command"] for r in store.rows if r.get("kind") == "run"]
    return write(rows.rows, out, command, cfg=cfg, sweeps=sweeps)


def _perplexity(args: argparse.Namespace, model: Any, tok: Any, configs: list[MethodConfig],
                store: RowStore, progress: Any, console: Any) -> None:
    from .perplexity import heldout_text, perplexity_windows
    from .runner import perplexity_cells

    key = {"kind": "perplexity", "task": "stdlib", "length": args.ppl_prefix, "seed": 0,
           "samples_asked": args.ppl_windows}
    todo = [c for c in configs if not store.has(**key, method=describe(c))]
    if not todo:
        return
    need = args.ppl_windows * (args.ppl_prefix + args.ppl_tokens)
    text = heldout_text(need, tok)
    windows = perplexity_windows(text, tok, args.ppl_prefix, args.ppl_tokens, args.ppl_windows)
    bar = progress.add_task(f"perplexity: {len(todo)} settings", total=len(windows))
    cells = perplexity_cells(model, windows, todo, dense_layers=args.dense_layers,
                             on_window=lambda: progress.advance(bar))
    for cfg in todo:
        nll, tokens, stats = cells[describe(cfg)]
        row = _row(cfg, stats, **key, tokens=tokens, nll=nll / tokens,
                   ppl=math.exp(nll / tokens))
        store.add(row)
        console.print(f"perplexity {row['method']}: {row['ppl']:.3f}")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a finished sweep (for notebooks and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
