"""The GGUF loading path, on tiny checkpoints written to .gguf here (no download).

For each family: our model loaded from the GGUF gives the logits transformers gives on the same file,
and the logits of the HF directory it was converted from; its tokenizer round-trips text.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf_writer import gguf_losses, write_gguf
from tiny import make_tiny, perturb

from workers.engine import Engine, EngineConfig, ModelConfig, PolicyDecision, SamplingParams

PROMPT = torch.randint(3, 384, (13,), generator=torch.Generator().manual_seed(7)).tolist()
TEXT = "the rain in Spain stays mainly, héllo 日本 </s>  tail "
# What each family's GGUF can carry, where make_tiny's checkpoint says more than that (see gguf_writer):
# qwen3's reader table has no head_dim key, so head_dim must be Qwen3Config's default; gemma3's has no
# query_pre_attn_scalar or layer_types, so those must be Gemma3TextConfig's (6 layers: 5 sliding, 1 full).
OVERRIDES = {
    "qwen3": {"head_dim": 128},
    "gemma3": {"num_hidden_layers": 6, "query_pre_attn_scalar": 256,
               "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
}
CASES = [("llama", "f32"), ("qwen2", "f32"), ("qwen3", "f32"), ("gemma3", "f32"), ("llama", "f16"), ("gemma3", "f16")]


def _tiny_for_gguf(family: str, root: Path) -> Path:
    """make_tiny's checkpoint, rebuilt with OVERRIDES and sharper attention: make_tiny's q/k weights
    (std 0.02 after norms of scale 0.2) give near-uniform attention, which would hide a wrong q/k
    row order (llama's rope permutation) within 1e-4. Same seed and randomized norms/biases otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = make_tiny(family, root)
    cfg = json.loads((path / "config.json").read_text()) | OVERRIDES.get(family, {})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
    perturb(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.5)
            if name.endswith(("q_norm.weight", "k_norm.weight")) and family != "gemma3":
                p.add_(1.0)
    for f in path.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{(family, dtype): (hf_dir, gguf_path)}; each GGUF in its own folder, so that transformers'
    tokenizer loader cannot pick up the HF directory's tokenizer.json instead of the file's."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family in sorted({f for f, _ in CASES}):
        hf_dir = _tiny_for_gguf(family, root / "hf")
        for family_, dtype in CASES:
            if family_ == family:
                out[family, dtype] = hf_dir, write_gguf(hf_dir, root / f"{family}-{dtype}" / "model.gguf", dtype=dtype)
    return out


def _engine_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    engine = Engine(EngineConfig([ModelConfig("m", str(path), dtype="float32", block_size=4, kv_cache_mb=4)]))
    rows: list[torch.Tensor] = []
    engine.add_policy("m", lambda step: rows.append(step.logits[0].clone()) or PolicyDecision())
    engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(rows) == 3
    return rows[0]  # the prefill's last position


def _hf_logits(path: Path, prompt: list[int], gguf_file: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, -1]


@pytest.mark.parametrize("family,dtype", CASES)
def test_gguf_logits_match_transformers_and_source(family, dtype, converted):
    hf_dir, gguf_path = converted[family, dtype]
    ours = _engine_logits(gguf_path, PROMPT)
    # (a) transformers reading the same file
    theirs = _hf_logits(gguf_path.parent, PROMPT, gguf_path.name)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # (b) the directory it was written from: exact in F32, within F16 rounding otherwise
    source = _hf_logits(hf_dir, PROMPT)
    tol = 1e-4 if dtype == "f32" else 1e-3
    torch.testing.assert_close(ours, source, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", sorted({f for f, _ in CASES}))
def test_gguf_tokenizer_round_trips(family, converted):
    from transformers import AutoTokenizer

    from workers.models import load_model

    hf_dir, gguf_path = converted[family, "f32"]
    loaded = load_model(gguf_path, dtype="float32")
    tok = loaded.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    assert ids == AutoTokenizer.from_pretrained(hf_dir).encode(TEXT, add_special_tokens=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert loaded.spec.eos_token_ids == [2]
    assert loaded.spec.tie_embeddings == (family != "qwen2")


def test_writer_refuses_what_gguf_cannot_carry(tmp_path):
    """make_tiny's qwen3 (head_dim 32) would load as head_dim 128 and fail; gemma3 would load with the
    wrong attention scale and layer types. The writer says so instead of writing a file that drifts."""
    for family in ("qwen3", "gemma3"):
        hf_dir = make_tiny(family, tmp_path)
        assert gguf_losses(json.loads((hf_dir / "config.json").read_text()))
        with pytest.raises(ValueError, match="would not get back"):
            write_gguf(hf_dir, tmp_path / f"{family}.gguf")
