"""Our forward pass against transformers on the same weights."""
from __future__ import annotations

import pytest
import torch
from conftest import make_engine
from tiny import FAMILIES, make_tiny

from workers.engine import PolicyDecision, SamplingParams


class RecordLogits:
    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def __call__(self, step):
        self.rows.append(step.logits[0].clone())
        return PolicyDecision()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_prefill_and_every_decode_step(family, tiny_paths):
    from transformers import AutoModelForCausalLM

    path = tiny_paths[family]
    engine = make_engine(path)
    rec = RecordLogits()
    engine.add_policy("m", rec)
    prompt = torch.randint(3, 384, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    assert len(rec.rows) == 12
    torch.testing.assert_close(torch.stack(rec.rows), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False), ("gemma3", False)])
def test_tied_and_untied_embeddings(family, tied, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny(family, tmp_path, tied=tied, seed=3)
    engine = make_engine(path)
    rec = RecordLogits()
    engine.add_policy("m", rec)
    engine.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=1, temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([[5, 6, 7, 8, 9]])).logits[0, -1]
    torch.testing.assert_close(rec.rows[0], ref, atol=2e-5, rtol=1e-4)


def test_bfloat16_close_to_float32(tiny_path):
    from workers.engine import Engine, EngineConfig, ModelConfig

    engine = Engine(EngineConfig([ModelConfig("m", str(tiny_path), dtype="bfloat16", block_size=4, kv_cache_mb=4)]))
    rec = RecordLogits()
    engine.add_policy("m", rec)
    engine.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=1, temperature=0))
    f32 = make_engine(tiny_path)
    rec32 = RecordLogits()
    f32.add_policy("m", rec32)
    f32.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=1, temperature=0))
    torch.testing.assert_close(rec.rows[0], rec32.rows[0], atol=0.05, rtol=0.05)
