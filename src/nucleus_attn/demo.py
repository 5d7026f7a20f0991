"""``nucleus-attn demo``: a long-context retrieval prompt on the bundled model, per method.

A pass key hidden in ~2k tokens of filler text is asked for at the end. The bundled
SmolLM2-135M-Instruct answers it with dense attention, then with each sparse method
(StreamingLLM as the naive baseline, Quest, Twilight, Tactic) switched on through
:func:`nucleus_attn.enable`. The table shows, side by side, the answer, whether it is
right, the fraction of tokens each decode step kept, the exact attention mass that
fraction carried, and the wall time.

On CPU the methods run as torch reference ops, so their wall times show the overhead of
selection, not a speed-up; speed is measured on GPU by ``nucleus-attn bench``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from .cliargs import add_methods_argument

DEFAULT_LENGTH = 2048
#: Methods compared by default: dense, the naive baseline at a fixed budget, a fixed-budget
#: selector at the same budget, and the two adaptive (top-p) methods.
DEFAULT_METHODS = ("dense", "streaming:window=252", "quest:budget=256", "twilight", "tactic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's flags."""
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH,
                        help=f"prompt length in tokens (default {DEFAULT_LENGTH}; the bundled "
                             "model's context is 8192, and it retrieves reliably up to ~2k)")
    parser.add_argument("--samples", type=int, default=1,
                        help="prompts per method, needles spread over depths 0.1-0.9 "
                             "(default 1: one needle in the middle)")
    add_methods_argument(parser, metavar="SPEC",
                         help="methods as name:key=value,... (default: "
                              f"{' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--dense-layers", type=int, default=2,
                        help="first layers kept dense (default 2)")
    parser.add_argument("--no-mass", action="store_true",
                        help="skip measuring the exact attention mass kept (faster)")
    parser.add_argument("--model", default=None,
                        help="another model directory or .gguf file (default: bundled)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated prompts")


@dataclass
class Row:
    """One method's results over the samples."""

    spec: str
    answers: list[str]
    correct: int
    kept: float | None
    sparse_kept: float | None
    mass: float | None
    seconds: float


def sample_indices(n: int) -> list[int]:
    """Indices of :func:`~nucleus_attn.eval.tasks.make_samples` whose needles sit at depths
    spread over 0.1-0.9 (sample ``i`` has depth ``DEPTHS[i % 11]``); one sample: depth 0.5."""
    if n == 1:
        return [5]
    if n <= 9:
        return sorted({round(1 + 8 * i / (n - 1)) for i in range(n)})
    return list(range(n))


def run_method(model: Any, tokenizer: Any, spec: str, samples: list[Any], dense_layers: int,
               diagnostics: bool, advance: Any) -> Row:
    """Answer every sample with ``spec`` switched on; ``advance()`` after each one."""
    import torch

    from .eval import tasks
    from .integrations import enable
    from .methods import parse_method

    answers, correct, seconds = [], 0, 0.0
    with enable(model, parse_method(spec), dense_layers=dense_layers,
                diagnostics=diagnostics) as handle:
        for sample in samples:
            enc = tokenizer(sample.prompt, return_tensors="pt").to(model.device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=tasks.max_new_tokens(sample.task),
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            seconds += time.perf_counter() - start
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.append(text)
            correct += tasks.score(sample, text)
            advance()
    s = handle.summary()
    return Row(s["spec"], answers, correct, s["mean_kept_fraction"], s["sparse_kept_fraction"],
               s["mean_mass"], seconds)


def _short(text: str, width: int = 12) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(nothing)"
    return line if len(line) <= width else line[: width - 1] + "…"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(rows: list[Row], samples: list[Any], prompt_tokens: list[int],
           dense_layers: int) -> Any:
    """The results as a rich table."""
    from rich.table import Table

    n = len(samples)
    depths = ", ".join(f"{s.depth:.1f}" for s in samples)
    title = (f"pass key retrieval, {max(prompt_tokens)}-token prompt"
             f"{'s' if n > 1 else ''} (needle depth {depths}), answer {samples[0].answer.strip()}"
             + (" ..." if n > 1 else ""))
    table = Table(title=title, caption=(
        f"kept: share of the tokens attended per decode step and KV head, over all layers "
        f"(the first {dense_layers} dense, counted as 100%) and over the sparse layers; "
        "mass: exact softmax mass of the kept tokens; time: generation on CPU with torch "
        "reference ops (not a speed-up)"))
    table.add_column("method", no_wrap=True)
    table.add_column("answer", no_wrap=True)
    table.add_column("ok", justify="center")
    table.add_column("kept", justify="right")
    table.add_column("kept (sparse)", justify="right")
    table.add_column("mass", justify="right")
    table.add_column("time", justify="right", no_wrap=True)
    for r in rows:
        ok = ("[green]yes" if r.correct else "[red]no") if n == 1 else (
            f"[{'green' if r.correct == n else 'red'}]{r.correct}/{n}")
        table.add_row(r.spec, _short(r.answers[0]), ok, _pct(r.kept), _pct(r.sparse_kept),
                      "-" if r.mass is None else f"{r.mass:.3f}", f"{r.seconds:.1f} s")
    return table


def run(args: argparse.Namespace) -> int:
    """Load the model, build the prompts, run every method, print the table."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from .eval import tasks
    from .methods import parse_method
    from .models import load_model

    console = Console()
    specs = args.methods or list(DEFAULT_METHODS)
    for spec in specs:
        try:
            parse_method(spec)
        except (TypeError, ValueError) as exc:
            console.print(f"[red]--methods {spec}: {exc}", highlight=False)
            return 2
    if args.samples < 1 or args.length < 64:
        console.print("[red]--samples must be >= 1 and --length >= 64")
        return 2
    from .extras import model_needs, require

    require("demo", *model_needs(args.model))

    start = time.perf_counter()
    with console.status(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'}"):
        model, tokenizer = load_model(args.model)
    indices = sample_indices(args.samples)
    with console.status(f"building {len(indices)} prompt(s) of {args.length} tokens"):
        pool = tasks.make_samples("passkey", max(indices) + 1, args.length, tokenizer,
                                  seed=args.seed)
    samples = [pool[i] for i in indices]
    prompt_tokens = [len(tokenizer.encode(s.prompt)) for s in samples]

    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("methods", total=len(specs) * len(samples))
        for spec in specs:
            progress.update(task, description=f"{spec:<24}")
            rows.append(run_method(model, tokenizer, spec, samples, args.dense_layers,
                                   not args.no_mass, lambda: progress.advance(task)))
    console.print(render(rows, samples, prompt_tokens, args.dense_layers))
    console.print(f"total wall time {time.perf_counter() - start:.0f} s (model load included)",
                  highlight=False)
    return 0
