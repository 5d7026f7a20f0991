"""Held-out text and windows for perplexity measurements (the data side).

Why: perplexity of a continuation scored after a long prefix shows whether sparse decode
attention loses information from far back. The text must be available offline and be the same
on every run, so it is taken from the Python standard library's own source files of the running
interpreter (deterministic for a given Python version: the files differ slightly between
versions, so record the version next to the results).

The perplexity loop for sparse methods lives elsewhere; :func:`dense_perplexity` is the dense
reference for one window.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

__all__ = ["STDLIB_FILES", "dense_perplexity", "heldout_text", "perplexity_windows"]

#: Large, long-lived standard-library modules read first, in this order; any other ``.py`` files
#: of the standard library directory follow in sorted order if more text is needed.
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "difflib.py", "inspect.py", "typing.py", "tarfile.py", "doctest.py",
    "subprocess.py", "pickle.py", "threading.py", "dataclasses.py", "enum.py", "shutil.py",
    "ast.py", "optparse.py", "ipaddress.py", "mailbox.py", "locale.py", "textwrap.py",
)

_SEPARATOR = "\n\n"


def _encode(text: str, tokenizer: Any) -> list[int]:
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise TypeError(
            f"tokenizer of type {type(tokenizer).__name__} has no encode(); pass a Hugging Face "
            "tokenizer or an object with encode(text) -> list[int]"
        )
    try:
        return list(encode(text, add_special_tokens=False))
    except TypeError:
        return list(encode(text))


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    first = [root / name for name in STDLIB_FILES if (root / name).is_file()]
    rest = sorted(p for p in root.glob("*.py") if p.name not in STDLIB_FILES)
    return first + rest


def heldout_text(min_tokens: int, tokenizer: Any) -> str:
    """Deterministic offline text of at least ``min_tokens`` tokens, from stdlib sources.

    Files from :data:`STDLIB_FILES` (then the remaining standard-library ``.py`` files in sorted
    order) are concatenated, separated by blank lines, until ``tokenizer`` counts at least
    ``min_tokens`` tokens.

    Parameters
    ----------
    min_tokens : int
        Minimum number of tokens the text must have.
    tokenizer : Any
        Tokenizer with ``encode(text)``.

    Returns
    -------
    str
        The concatenated source text.

    Raises
    ------
    ValueError
        If ``min_tokens`` is not positive or the standard library holds too little text.
    """
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens must be a positive integer, got {min_tokens!r}")
    parts: list[str] = []
    estimate = 0
    for path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(source)
        estimate += len(_encode(source, tokenizer))
        # Per-file counts can differ slightly from the joined count; check the real text.
        if estimate >= min_tokens:
            text = _SEPARATOR.join(parts)
            if len(_encode(text, tokenizer)) >= min_tokens:
                return text
    raise ValueError(
        f"the standard library at {sysconfig.get_paths()['stdlib']} holds fewer than "
        f"{min_tokens} tokens of source; ask for fewer tokens"
    )


def perplexity_windows(
    text: str, tokenizer: Any, prefix_len: int, eval_len: int, n: int
) -> list[tuple[list[int], list[int]]]:
    """Cut ``text`` into ``n`` non-overlapping ``(prefix ids, continuation ids)`` windows.

    Window ``i`` covers tokens ``[i * w, (i + 1) * w)`` with ``w = prefix_len + eval_len``; the
    first ``prefix_len`` are the context and the last ``eval_len`` are scored. Special tokens are
    not added, so windows are plain slices of the text's tokens.

    Parameters
    ----------
    text : str
        Source text, e.g. from :func:`heldout_text`.
    tokenizer : Any
        Tokenizer with ``encode(text)``.
    prefix_len : int
        Context tokens per window (at least 1).
    eval_len : int
        Scored tokens per window (at least 1).
    n : int
        Number of windows (at least 1).

    Returns
    -------
    list of (list of int, list of int)
        ``n`` windows.

    Raises
    ------
    ValueError
        If a size is not positive or the text is too short; the message says how many tokens
        are needed.
    """
    for name, value in (("prefix_len", prefix_len), ("eval_len", eval_len), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    ids = _encode(text, tokenizer)
    width = prefix_len + eval_len
    if len(ids) < n * width:
        raise ValueError(
            f"text has {len(ids)} tokens but {n} windows of {width} need {n * width}; pass "
            f"heldout_text({n * width}, tokenizer) or ask for fewer or shorter windows"
        )
    windows = []
    for i in range(n):
        chunk = ids[i * width:(i + 1) * width]
        windows.append((chunk[:prefix_len], chunk[prefix_len:]))
    return windows


def dense_perplexity(model: Any, prefix_ids: list[int], cont_ids: list[int]) -> float:
    """Perplexity of ``cont_ids`` after ``prefix_ids`` with the model's own (dense) attention.

    One forward pass over prefix and continuation; only the continuation tokens are scored,
    each predicted from everything before it. This is the reference the sparse methods are
    compared with.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Causal language model.
    prefix_ids : list of int
        Context token ids (at least one).
    cont_ids : list of int
        Scored token ids (at least one).

    Returns
    -------
    float
        ``exp`` of the mean negative log-likelihood of the continuation tokens.

    Raises
    ------
    ValueError
        If either list is empty.
    """
    import torch

    if len(prefix_ids) < 1 or len(cont_ids) < 1:
        raise ValueError(
            f"need at least one prefix and one continuation token, got {len(prefix_ids)} and "
            f"{len(cont_ids)}"
        )
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix_ids) + list(cont_ids)], dtype=torch.long, device=device)
    n_cont = len(cont_ids)
    with torch.inference_mode():
        # Logits at positions P-1 .. P+C-2 predict the C continuation tokens.
        logits = model(input_ids=ids, logits_to_keep=n_cont + 1).logits[0, :-1]
        target = ids[0, -n_cont:]
        nll = torch.nn.functional.cross_entropy(logits.float(), target, reduction="mean")
    return math.exp(nll.item())
