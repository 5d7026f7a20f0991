"""Where ``eval`` and ``bench`` write their results, and whose folder a folder is.

Why: both commands used to write into the repository's committed ``results/`` by default,
so a first run (or ``eval --report-only``) rewrote the measured results. Now each command
writes under ``./nucleus-attn-results/<command>/`` unless ``--out`` says otherwise (the
committed results are made with an explicit ``--out results/...``), and prints the folder
before it starts.

A folder a command writes into holds a small manifest, ``nucleus-attn.json``, naming the
command. A command refuses a folder whose manifest names another command (its rows would
mix with the other command's files), or, in a folder without a manifest (results written
before manifests existed), another command's files. Other files (logs, notes) do not
matter: scripts keep their logs beside the results.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

#: Parent of the default output folders, relative to the current directory.
DEFAULT_ROOT = Path("nucleus-attn-results")
#: The manifest file naming the command that writes a folder.
MANIFEST = "nucleus-attn.json"
#: Files that mark a folder as a command's when it has no manifest (older results).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "eval": ("rows.jsonl", "candidates_rows.jsonl"),
    "bench": ("bench_*.json",),
}


def default_out(command: str) -> Path:
    """The default output folder of ``command``: ``nucleus-attn-results/<command>``."""
    return DEFAULT_ROOT / command


def owner(out: Path) -> str | None:
    """The command named by ``out``'s manifest, or None when it has none."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["command"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a nucleus-attn manifest (a JSON object with a "
                         "'command'); delete it or choose another --out") from None


def check(out: Path | str, command: str) -> str | None:
    """Raise ValueError unless ``command`` may write into ``out`` (see :func:`claim`);
    return the command its manifest names (None: no manifest yet)."""
    out = Path(out)
    instead = f"pass another --out (the default is {default_out(command)}/)"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; {instead}")
    found = owner(out)
    if found is not None and found != command:
        raise ValueError(f"--out {out} holds the results of `nucleus-attn {found}` (its "
                         f"{MANIFEST} says so); `nucleus-attn {command}` does not mix its "
                         f"files into them: {instead}")
    if found is None and out.is_dir():
        for other, patterns in SIGNATURES.items():
            hit = next((f for p in patterns for f in out.glob(p)), None)
            if other != command and hit is not None:
                raise ValueError(f"--out {out} holds the results of `nucleus-attn {other}` "
                                 f"({hit.name}); `nucleus-attn {command}` does not mix its "
                                 f"files into them: {instead}")
    return found


def claim(out: Path | str, command: str) -> Path:
    """Check that ``command`` may write into ``out``, create it and mark it as its own.

    Parameters
    ----------
    out : Path or str
        The output folder (``--out``).
    command : str
        The command that writes there, e.g. ``"eval"`` or ``"bench"``.

    Returns
    -------
    Path
        ``out``, created, with a manifest naming ``command``.

    Raises
    ------
    ValueError
        ``out`` is a file, or its manifest (or, without one, its files) belongs to
        another command; the message names a folder to use instead.
    """
    out = Path(out)
    found = check(out, command)
    out.mkdir(parents=True, exist_ok=True)
    if found is None:
        from . import __version__

        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (out / MANIFEST).write_text(json.dumps(
            {"command": command, "created": stamp, "nucleus_attn": __version__}, indent=1)
            + "\n")
    return out
