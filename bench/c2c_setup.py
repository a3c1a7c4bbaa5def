"""What `bench/c2c_speed.py` runs on: the two models (random at real shapes, or tiny), their engine, a
fuser with every gate open, and a C2C whose fusion step is timed with the device synchronized."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from c2c_transfer import sync
from decode_step_gpu import NullTokenizer, config

from c2c import colocated
from c2c.colocated import C2C
from c2c.fuser import Fuser, FuserConfig, KVShape
from workers.engine import Engine, EngineConfig, ModelConfig

TINY = {
    "tiny-receiver": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "tiny-sharer": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=6, num_attention_heads=6,
                        num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}

class IdTokenizer(NullTokenizer):
    """What C2C's token aligner asks of a tokenizer; two of them count as one vocabulary (ids pass unchanged)."""

    unk_token_id = pad_token_id = None
    all_special_ids: list[int] = []

    def get_vocab(self) -> dict:
        return {}


def random_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config

    from workers.models import LoadedModel
    from workers.models.decoder import CausalLM
    from workers.models.spec import ModelSpec

    if shape in TINY:
        hf = Qwen2Config(**TINY[shape], max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    else:
        hf = config(shape)
    spec = ModelSpec.from_hf_config(hf)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = CausalLM(spec).eval()
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return LoadedModel(model, spec, IdTokenizer(), Path(shape), dtype)


def build_engine(args) -> Engine:
    if args.random:
        dtype = torch.float32 if args.tiny else torch.bfloat16
        torch.manual_seed(0)
        preloaded = {"recv": random_model(args.receiver, args.device, dtype),
                     "shr": random_model(args.sharer, args.device, dtype)}
        paths = {"recv": args.receiver, "shr": args.sharer}
    else:
        preloaded, paths = None, {"recv": args.receiver_path, "shr": args.sharer_path}
    dtype = "float32" if args.tiny else "bfloat16"
    models = [ModelConfig(name, paths[name], dtype=dtype, device=args.device, kv_cache_mb=args.kv_mb,
                          max_graph_batch=8) for name in ("recv", "shr")]
    # No prefix caching: a repeated prompt must be prefilled again (the prompts differ per run as well).
    return Engine(EngineConfig(models, max_num_seqs=16, max_num_batched_tokens=8192, enable_prefix_caching=False),
                  preloaded=preloaded)


def make_fuser(engine: Engine, args, gate: float = 1.0) -> Fuser:
    r, s = engine.model("recv").runner.spec, engine.model("shr").runner.spec
    torch.manual_seed(1)
    cfg = FuserConfig(KVShape(r.num_layers, r.num_kv_heads, r.head_dim), KVShape(s.num_layers, s.num_kv_heads, s.head_dim),
                      hidden=args.fuser_hidden, intermediate=args.fuser_intermediate, depth=args.fuser_depth)
    fuser = Fuser(cfg)
    with torch.no_grad():
        for layer in fuser.layers:
            layer.gate_logits.fill_(gate)          # > 0: every K and V gate open (the worst case)
    return fuser.eval()


class SyncedC2C(C2C):
    """C2C whose fusion step is also timed with the device synchronized before and after (`fuser_synced_s`),
    and within it the fuser's projection alone (`fuser_only_s`: `c2c.fuser.fuse`, no KV reads or writes)."""

    def _fuse(self, state, seq) -> None:
        plain, spent = colocated.fuse, [0.0]

        def timed_fuse(*args, **kw):
            sync()
            t = time.perf_counter()
            out = plain(*args, **kw)
            sync()
            spent[0] += time.perf_counter() - t
            return out

        sync()
        t0 = time.perf_counter()
        colocated.fuse = timed_fuse
        try:
            super()._fuse(state, seq)
        finally:
            colocated.fuse = plain
        sync()
        state.stats["fuser_synced_s"] = state.stats.get("fuser_synced_s", 0.0) + time.perf_counter() - t0
        state.stats["fuser_only_s"] = state.stats.get("fuser_only_s", 0.0) + spent[0]
