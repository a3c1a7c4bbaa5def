"""The real small models, when installed (`tandem models install --all`); skipped otherwise."""
from __future__ import annotations

import os

import pytest
import torch

from tandem import assets

MODELS = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
if os.environ.get("TANDEM_TEST_LARGE"):
    MODELS.append("qwen2.5-coder-1.5b-instruct")


def _path(name: str):
    try:
        return assets.resolve(name)
    except Exception as e:
        pytest.skip(f"{name} is not installed ({e})")


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_real_model_matches_transformers(name):
    from transformers import AutoModelForCausalLM

    from workers.engine import Engine, EngineConfig, ModelConfig, PolicyDecision, SamplingParams

    path = _path(name)
    engine = Engine(EngineConfig([ModelConfig("m", str(path), dtype="float32", kv_cache_mb=64)]))
    tok = engine.model().tokenizer
    messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    if getattr(tok, "chat_template", None):
        prompt = list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
    else:
        prompt = tok.encode("The capital of France is", add_special_tokens=True)
    rows = []
    engine.add_policy("m", lambda step: rows.append(step.logits[0].clone()) or PolicyDecision())
    out = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    del engine
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    ours = torch.stack(rows)
    assert (ours - ref).abs().max() < 2e-3 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    if "capital" in messages[0]["content"] and getattr(tok, "chat_template", None):
        assert "Paris" in out.text
