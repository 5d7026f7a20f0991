"""``nucleus-attn eval``: accuracy-vs-budget sweeps on offline long-context tasks.

For each task and context length, dense attention runs first; a (task, length) cell where
dense scores under ``--min-dense-accuracy`` is reported and not swept (a 135M model cannot
answer every task at every length, and a method cannot be judged where dense fails).
Every row goes to ``rows.jsonl`` as soon as it is done, so an interrupted sweep resumes;
the markdown report and the plots are rebuilt from all rows at the end.

Results go to ``nucleus-attn-results/eval/`` unless ``--out`` names another folder (see
:mod:`nucleus_attn.outdir`); ``--quick`` is a preset that finishes in a few minutes on a
laptop CPU. A progress bar counts decode passes (a batch of prompts under one method
setting) and estimates the time left.
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
from ..outdir import check as check_out
from ..outdir import claim, default_out
from . import report
from .store import RowStore

DEFAULT_SWEEP = (
    "oracle-topp:p=0.8,0.9,0.95",
    "streaming:window=64,256,1024",
    "quest:budget=64,128,256,512,1024",
    "twilight:p=0.8,0.9,0.95,0.99",
    "tactic:p=0.8,0.9,0.95",
)
#: What a flag left unset means, without and with ``--quick``.
DEFAULTS: dict[str, Any] = {"tasks": None, "lengths": [2048], "samples": 20,
                            "methods": list(DEFAULT_SWEEP), "batch_size": 8}
#: ``--quick``: two tasks the bundled model answers at 1024 tokens, one batch of 4 prompts
#: each, the default Twilight against Quest and StreamingLLM at about the same budget:
#: 8 decode passes, about 1.5 minutes on a 2-core CPU (model load included).
QUICK: dict[str, Any] = {"tasks": ["passkey", "multikey"], "lengths": [1024], "samples": 4,
                         "methods": ["twilight", "quest:budget=128", "streaming:window=124"],
                         "batch_size": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF model dir, .gguf file, or 'bundled' (default: the bundled "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true",
                        help="a preset that finishes in a few minutes on a laptop CPU: "
                             f"--tasks {' '.join(QUICK['tasks'])} --lengths "
                             f"{' '.join(map(str, QUICK['lengths']))} --samples "
                             f"{QUICK['samples']} --batch-size {QUICK['batch_size']} "
                             f"--methods {' '.join(QUICK['methods'])} (flags given "
                             "explicitly still apply)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task kinds (default: all of nucleus_attn.eval.tasks.TASKS)")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="context lengths in tokens (default 2048; the study uses "
                             "2048 4096 8192)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per task and length (default 20; the study uses 100)")
    add_methods_argument(parser, metavar="NAME:k=v1,v2,...",
                         help="method sweeps; dense always runs first (default: "
                              + " ".join(DEFAULT_SWEEP) + ")")
    parser.add_argument("--dense-layers", type=int, default=2,
                        help="first layers kept dense (default 2)")
    parser.add_argument("--min-dense-accuracy", type=float, default=0.8,
                        help="sweep a (task, length) only where dense reaches this accuracy "
                             "(default 0.8)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per batch (default 8)")
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
    parser.add_argument("--out", type=Path, default=default_out("eval"),
                        help="output folder: rows.jsonl, report.md, PNGs (default "
                             f"{default_out('eval')}/; a folder another command wrote is "
                             "refused)")
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
    missing = report.unrecorded(store.rows)
    if missing:
        md += ["Parameters some rows do not record (added after those rows ran; their labels "
               "say nothing of them): " + "; ".join(f"{name}: {', '.join(fields)}"
                                                   for name, fields in missing.items()), ""]
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


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from :data:`QUICK` (``--quick``) or :data:`DEFAULTS`."""
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    return args


def check(args: argparse.Namespace) -> tuple[list[str], list[MethodConfig]]:
    """Every argument checked before any work: the task names and the method settings."""
    from . import tasks as task_lib

    if not 0.0 <= args.min_dense_accuracy <= 1.0:
        raise ValueError(f"--min-dense-accuracy={args.min_dense_accuracy} must be in [0, 1]")
    for flag, value in (("--samples", args.samples), ("--batch-size", args.batch_size),
                        *(("--lengths", n) for n in args.lengths)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    names = args.tasks or list(task_lib.TASKS)
    for name in names:
        task_lib.max_new_tokens(name)  # unknown task -> ValueError listing the known ones
    return names, _configs(args.methods)


class SweepProgress:
    """One progress bar over the whole sweep, in decode passes (a batch of prompts under
    one method setting), with the time left; cells that dense fails shrink the total."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.bar = progress.add_task("sweep", total=total)
        progress.advance(self.bar, 0)  # the start: the first pass then gives a speed

    def describe(self, text: str) -> None:
        self.progress.update(self.bar, description=text)

    def advance(self, passes: int = 1) -> None:
        self.progress.advance(self.bar, passes)

    def drop(self, passes: int) -> None:
        """``passes`` that will not run after all (a cell not swept)."""
        task = self.progress.tasks[self.bar]
        self.progress.update(self.bar, total=max(task.completed, (task.total or 0) - passes))

    def status(self) -> str:
        """``done/total, ~time left`` for the log lines (the bar is not drawn in a log)."""
        task = self.progress.tasks[self.bar]
        left = task.time_remaining
        eta = "" if left is None else f", ~{_duration(left)} left"
        return f"{task.completed:.0f}/{task.total:.0f} passes{eta}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else (
        f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def _batches(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size)


def _plan(args: argparse.Namespace, names: list[str], configs: list[MethodConfig],
          store: RowStore, study: Any) -> int:
    """Decode passes the sweep has left to run (as the loop in :func:`run` counts them)."""
    batches = _batches(args.samples, args.batch_size)
    total = 0
    for length in args.lengths:
        for name in names:
            key = {"kind": "task", "task": name, "length": length, "seed": args.seed,
                   "samples_asked": args.samples}
            if store.has(**{**key, "kind": "dropped", "method": "dense"}):
                continue
            if args.candidates_only:
                want = study is not None and not all(
                    study[0].has(name, length, args.seed, i) for i in range(args.samples))
                total += batches if want else 0
                continue
            total += batches * sum(not store.has(**key, method=describe(c)) for c in configs)
    if args.perplexity:
        key = {"kind": "perplexity", "task": "stdlib", "length": args.ppl_prefix, "seed": 0,
               "samples_asked": args.ppl_windows}
        total += args.ppl_windows * sum(not store.has(**key, method=describe(c))
                                        for c in configs)
    return total


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..extras import model_needs, require
    from . import tasks as task_lib

    console = Console(soft_wrap=True)  # log lines whole: paths and counts stay greppable
    command = "nucleus-attn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    resolve(args)
    if args.report_only:
        require("eval --report-only", "matplotlib")
        check_out(args.out, "eval")
        if not (args.out / "rows.jsonl").is_file():
            raise FileNotFoundError(f"--report-only: {args.out / 'rows.jsonl'} does not exist; "
                                    "pass the --out of a sweep that ran")
    else:
        require("eval", *model_needs(args.model), "matplotlib")
        names, configs = check(args)
    claim(args.out, "eval")
    console.print(f"results: {args.out.resolve()}", highlight=False)
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

    from ..models import load_model
    from .runner import run_cells

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    env = (f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {dtype}, "
           f"python {sys.version.split()[0]}, torch {torch.__version__}")
    total = _plan(args, names, configs, store, study)
    console.print(f"{len(configs)} method settings (dense included), tasks {names}, lengths "
                  f"{args.lengths}, {args.samples} samples each: {total} decode passes of up "
                  f"to {args.batch_size} prompts to run", highlight=False)
    store.add({"kind": "run", "command": command, "env": env})
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    with console.status(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'}"):
        model, tok = load_model(args.model, dtype=dtype, device=device)
    tok.padding_side = "left"
    console.print(f"model loaded in {time.perf_counter() - t0:.1f} s on {device} ({dtype})",
                  highlight=False)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("passes"), TimeElapsedColumn(), TextColumn("left"),
               TimeRemainingColumn())
    # speed over the whole run: passes are seconds to minutes apart
    with Progress(*columns, console=console, speed_estimate_period=24 * 3600) as progress:
        sweep = SweepProgress(progress, total)
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
                    sweep.describe(f"{name}@{length}: candidates")
                    _study_only(study, samples, model, tok, args.batch_size, hook,
                                sweep.advance)
                    continue
                # dense first, alone, so that a cell where dense fails is not swept; with
                # --min-dense-accuracy 0 nothing is dropped and one prefill serves them all
                if args.min_dense_accuracy > 0:
                    stages = [[c for c in todo if c.name == "dense"],
                              [c for c in todo if c.name != "dense"]]
                else:
                    stages = [todo]
                stages = [stage for stage in stages if stage]
                for i, stage in enumerate(stages):
                    sweep.describe(f"{name}@{length}: "
                                   + (stage[0].name if len(stage) == 1 else
                                      f"{len(stage)} settings"))
                    cells = run_cells(model, tok, prompts, new, stage,
                                      dense_layers=args.dense_layers,
                                      batch_size=args.batch_size, judge=judge,
                                      on_cell=sweep.advance, on_prefill=hook)
                    hook = None  # the study needs one prefill per batch
                    for cfg in stage:
                        correct, stats, secs = cells[describe(cfg)]
                        row = _row(cfg, stats, **key, samples=len(prompts),
                                   correct=correct, accuracy=correct / len(prompts),
                                   seconds=secs)
                        store.add(row)
                        console.print(f"{name}@{length} {row['method']}: "
                                      f"{100 * row['accuracy']:.0f}% correct, kept "
                                      f"{100 * row['kept_fraction']:.2f}%, mass "
                                      f"{row['mass']:.4f}  [{sweep.status()}]",
                                      highlight=False)
                    dense_row = next(r for r in store.rows if r.get("kind") == "task" and
                                     r["task"] == name and r["length"] == length and
                                     r["name"] == "dense" and r["seed"] == args.seed and
                                     r["samples_asked"] == args.samples)
                    if dense_row["accuracy"] < args.min_dense_accuracy:
                        store.add({**key, "kind": "dropped", "method": "dense",
                                   "accuracy": dense_row["accuracy"]})
                        skipped = sum(len(s) for s in stages[i + 1:])
                        sweep.drop(skipped * _batches(len(prompts), args.batch_size))
                        console.print(f"[yellow]{name}@{length}: dense scores "
                                      f"{100 * dense_row['accuracy']:.0f}% < "
                                      f"{100 * args.min_dense_accuracy:.0f}%: not swept")
                        break

        if args.perplexity:
            sweep.describe("perplexity")
            _perplexity(args, model, tok, configs, store, sweep.advance, console)

    for path in write_report(store, args.out, command):
        console.print(f"wrote {path}")
    if study is not None and study[0].rows:
        for path in _write_candidates(study, store, args.out, command):
            console.print(f"wrote {path}")
    console.print(f"done in {_duration(time.perf_counter() - t0)}; results in "
                  f"{args.out.resolve()}", highlight=False)
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
                store: RowStore, advance: Callable[[int], Any], console: Any) -> None:
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
    cells = perplexity_cells(model, windows, todo, dense_layers=args.dense_layers,
                             on_window=lambda: advance(len(todo)))
    for cfg in todo:
        nll, tokens, stats = cells[describe(cfg)]
        row = _row(cfg, stats, **key, tokens=tokens, nll=nll / tokens,
                   ppl=math.exp(nll / tokens))
        store.add(row)
        console.print(f"perplexity {row['method']}: {row['ppl']:.3f}")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a finished sweep (for notebooks and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
