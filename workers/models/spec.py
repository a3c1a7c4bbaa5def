"""ModelSpec: everything the forward pass needs, read once from a transformers config."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tandem.errors import CheckpointError

SUPPORTED = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gemma3": "gemma3"}


@dataclass
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: str
    qkv_bias: bool
    qk_norm: bool
    gemma_norms: bool
    embed_scale: float | None
    attn_scale: float
    tie_embeddings: bool
    max_model_len: int
    final_logit_softcap: float | None
    layer_types: list[str]
    sliding_window: int | None
    rope: dict[str, tuple[torch.Tensor, float]] = field(repr=False)
    eos_token_ids: list[int] = field(default_factory=list)

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        config = getattr(config, "text_config", None) or config
        family = SUPPORTED.get(config.model_type)
        if family is None:
            raise CheckpointError(
                f"model_type {config.model_type!r} is not supported; supported: {sorted(set(SUPPORTED))}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        gemma = family == "gemma3"
        n_layers = config.num_hidden_layers
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
        window = getattr(config, "sliding_window", None)
        if not gemma and not getattr(config, "use_sliding_window", False):
            layer_types = ["full_attention"] * n_layers
        eos = config.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=n_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            activation=getattr(config, "hidden_activation", None) or config.hidden_act,
            qkv_bias=bool(getattr(config, "attention_bias", False)) or family == "qwen2",
            qk_norm=family in ("qwen3", "gemma3"),
            gemma_norms=gemma,
            embed_scale=config.hidden_size**0.5 if gemma else None,
            attn_scale=(config.query_pre_attn_scalar if gemma else head_dim) ** -0.5,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_model_len=config.max_position_embeddings,
            final_logit_softcap=getattr(config, "final_logit_softcapping", None),
            layer_types=layer_types,
            sliding_window=window if "sliding_attention" in layer_types else None,
            rope={t: _rope_inv_freq(config, t, head_dim) for t in sorted(set(layer_types))},
            eos_token_ids=eos_ids,
        )


def _rope_inv_freq(config, layer_type: str, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None)
    nested = isinstance(params, dict) and layer_type in params
    if nested:
        params = params[layer_type]
    if params is None:
        scaling = getattr(config, "rope_scaling", None) or {}
        params = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                  "rope_theta": getattr(config, "rope_theta", 10000.0)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    if rope_type == "dynamic":
        raise CheckpointError("rope_type 'dynamic' depends on sequence length and is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS[rope_type]
    inv, scale = fn(config, None, layer_type=layer_type) if nested else fn(config, None)
    return inv.float(), float(scale)


def rope_cache(inv_freq: torch.Tensor, scale: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

