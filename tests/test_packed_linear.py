"""The CPU bf16 fast path: oneDNN-packed linears give exactly what F.linear gives."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.models import packed_linear
from workers.models.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")), reason="no oneDNN bf16 packing here")


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_linear(monkeypatch, spill, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 1000, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    want = linear(x)
    if spill:
        monkeypatch.setattr(packed_linear, "SPILL_BYTES", 1)
        monkeypatch.setattr(packed_linear, "CHUNK_ROWS", 128)
    packed = PackedLinear.from_linear(linear, shared=False)
    assert len(packed.packed) == (8 if spill else 1)
    assert not hasattr(linear, "weight") or not spill
    assert torch.equal(packed(x), want)


def test_pack_linears_keeps_tied_embeddings(tiny_paths, monkeypatch):
    from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

    monkeypatch.setattr(packed_linear, "SPILL_BYTES", 1)
    config = ModelConfig("m", str(tiny_paths["llama"]), dtype="bfloat16", block_size=4, kv_cache_mb=4,
                         cpu_packed_linear=False)
    engine = Engine(EngineConfig([config]))
    model = engine.model().runner.model
    before = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    assert pack_linears(model) == 1 + 4 * len(model.model.layers)
    assert model.model.embed_tokens.weight.shape[0] == 384
    after = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    assert after == before
