"""The CPU fast path: oneDNN-packed linears give exactly what F.linear gives in bf16, within rounding in fp32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tandem_kernels import cpu_gemm
from workers.models import packed_linear
from workers.models.packed_linear import PackedLinear, can_pack, is_file_backed, map_embeddings, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")), reason="no oneDNN bf16 packing here")


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", ["onednn", "tiles"])
def test_packed_equals_linear(monkeypatch, spill, bias, kernel):
    """oneDNN's packing is F.linear to the bit; our tiles are within bf16 rounding of it (tests/test_cpu_gemm.py),
    whole or packed chunk by chunk from the spill file."""
    if kernel == "tiles" and not cpu_gemm.available():
        pytest.skip("no AVX-512 BF16 CPU or no C++ compiler here")
    torch.manual_seed(0)
    linear = nn.Linear(64, 1000, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    want = linear(x)
    whole = PackedLinear.from_linear(linear, shared=True, kernel=kernel)
    if spill:
        monkeypatch.setattr(packed_linear, "SPILL_BYTES", 1)
        monkeypatch.setattr(packed_linear, "CHUNK_ROWS", 128)
    packed = PackedLinear.from_linear(linear, shared=False, kernel=kernel)
    assert packed.kernel == kernel and len(packed.packed) == (8 if spill and kernel == "onednn" else 1)
    assert not hasattr(linear, "weight") or not spill
    got = packed(x)
    assert torch.equal(got, whole(x))
    if kernel == "onednn":
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-3)


def test_bf16_takes_the_tiles_where_the_cpu_has_them():
    linear = nn.Linear(64, 48, dtype=torch.bfloat16)
    assert PackedLinear.from_linear(linear, shared=True).kernel == ("tiles" if cpu_gemm.available() else "onednn")
    assert PackedLinear.from_linear(nn.Linear(64, 48), shared=True).kernel == "onednn"


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_packed_fp32_within_rounding(rows):
    torch.manual_seed(0)
    linear = nn.Linear(256, 1000, bias=True)
    x = torch.randn(rows, 256)
    exact = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert can_pack(torch.float32, torch.device("cpu"))
    got = PackedLinear.from_linear(linear, shared=True)(x)
    assert got.dtype == torch.float32
    err = (got.double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-5


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


def _in_deleted_file_mapping(t: torch.Tensor) -> bool:
    """True when `t`'s memory lies in a mapping of a removed file (the spilled table), not on the heap."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        span, *_, tail = line.split(maxsplit=5) + [""]
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= ptr < hi:
            return "(deleted)" in line
    return False


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_embeddings_are_file_backed_and_held_once(tiny_paths, kind):
    """Tied (llama here) or not, the embedding table ends in a file mapping and the packed lm_head is the only
    copy in memory; lookups, logits and greedy tokens stay exactly what they were."""
    from workers.engine import Engine, EngineConfig, ModelConfig, SamplingParams

    config = ModelConfig("m", str(tiny_paths[kind]), dtype="bfloat16", block_size=4, kv_cache_mb=4,
                         cpu_packed_linear=False)
    engine = Engine(EngineConfig([config]))
    model = engine.model().runner.model
    table = model.model.embed_tokens.weight.detach().clone()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    before = engine.generate([[5, 6, 7]], params)[0]
    pack_linears(model)
    assert map_embeddings(model) == (0 if tied else 1)
    assert map_embeddings(model) == 0
    weight = model.model.embed_tokens.weight
    assert is_file_backed(weight) and _in_deleted_file_mapping(weight) and torch.equal(weight, table)
    after = engine.generate([[5, 6, 7]], params)[0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs


@pytest.mark.parametrize("kernel", ["onednn", "tiles"])
def test_a_spilled_weight_is_freed_before_packing_even_from_a_reference_cycle(monkeypatch, kernel):
    """The original and its packed copy must never be in memory together, even when the original still sits
    in a reference cycle that only the garbage collector frees (this once kept a 270 MB lm_head alive)."""
    import gc
    import weakref

    if kernel == "tiles" and not cpu_gemm.available():
        pytest.skip("no AVX-512 BF16 CPU or no C++ compiler here")
    monkeypatch.setattr(packed_linear, "SPILL_BYTES", 1)
    linear = nn.Linear(64, 300, bias=False, dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = linear(x)

    class Cycle:
        pass

    cycle = Cycle()
    cycle.self, cycle.weight = cycle, linear.weight
    original = weakref.ref(linear.weight)
    del cycle
    alive_at_pack = []
    real_pack = packed_linear._pack
    monkeypatch.setattr(packed_linear, "_pack", lambda *a: (alive_at_pack.append(original() is not None), real_pack(*a))[1])
    gc.disable()
    try:
        packed = PackedLinear.from_linear(linear, shared=False, kernel=kernel)
    finally:
        gc.enable()
    assert alive_at_pack and not any(alive_at_pack)
    assert torch.allclose(packed(x).float(), want.float(), rtol=2**-7, atol=1e-3)
    if kernel == "onednn":
        assert torch.equal(packed(x), want)
