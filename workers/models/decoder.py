"""The decoder-only transformer over flattened tokens and a paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from kernels import AttentionMetadata
from workers.models.layers import GatedMLP, RMSNorm, apply_rotary
from workers.models.spec import ModelSpec


@dataclass
class ForwardBatch:
    """One step's inputs beside the token ids: where K/V go and how attention reads them."""

    meta: AttentionMetadata
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.attn_scale
        self.window = spec.window_of(layer)
        self.layer_type = spec.layer_types[layer]
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.gemma_norms)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.gemma_norms)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = batch.rope[self.layer_type]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = batch.k_caches[self.layer], batch.v_caches[self.layer]
        kernels.store_kv(k_cache, v_cache, k, v.contiguous(), batch.meta.slot_mapping)
        o = kernels.paged_attention(q, k_cache, v_cache, batch.meta, self.scale, self.window)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        eps, gemma = spec.rms_norm_eps, spec.gemma_norms
        self.self_attn = Attention(spec, layer)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.activation)
        self.input_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        self.sandwich = gemma

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), batch)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.gemma_norms)
        self.embed_scale = spec.embed_scale

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, batch)
        return self.norm(x)


class CausalLM(nn.Module):
    """`forward` returns the final normed hidden state of every token; `logits` maps rows to the vocabulary."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, batch)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.spec.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
