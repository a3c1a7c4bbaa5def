"""The decoder-only transformer over flattened tokens and a paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import tandem_kernels as kernels
from tandem_kernels import AttentionMetadata
from workers.models.layers import GatedMLP, RMSNorm, apply_rotary, rotary_rows
from workers.models.spec import ModelSpec


@dataclass
class ForwardBatch:
    """One step's inputs beside the token ids: where K/V go, how attention reads them, RoPE tables."""

    meta: AttentionMetadata
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def rotate_and_store(self, layer: int, layer_type: str, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> torch.Tensor:
        """Rotary embedding on q and k, then k and v into the layer's cache slots; returns the rotated q."""
        cos, sin = self.rope[layer_type]
        pos, slots = self.meta.positions, self.meta.slot_mapping
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        if q.is_cuda:
            kernels.rope_store_kv(q, k, v, cos, sin, pos, k_cache, v_cache, slots)
            return q
        cos, sin = self.meta.memo(("rope", layer_type), lambda: rotary_rows(cos, sin, pos))
        qk = _adjacent_heads(q, k)
        if qk is None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            rotated = apply_rotary(qk, cos, sin)
            q, k = rotated[:, : q.shape[1]], rotated[:, q.shape[1]:]
        kernels.store_kv(k_cache, v_cache, k, v, slots)
        return q


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k as one `[T, q_heads + kv_heads, d]` view when k's heads follow q's in memory (both cut from
    the fused qkv projection), so that one rotary pass serves both."""
    head = q.stride(1)
    if q.stride() != k.stride() or head != q.shape[2] or k.data_ptr() != q.data_ptr() + q.shape[1] * head * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


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
        return self.attend(kernels.linear(x, self.qkv_proj), batch)

    def attend(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """From the fused q/k/v projection of the step's tokens to the output projection."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        q = batch.rotate_and_store(self.layer, self.layer_type, q, k, v)
        o = kernels.paged_attention(q, batch.k_caches[self.layer], batch.v_caches[self.layer], batch.meta,
                                    self.scale, self.window)
        return kernels.linear(o.reshape(t, self.q_size), self.o_proj)


class DecoderLayer(nn.Module):
    """Pre-norm layer; Gemma's is a sandwich (norms after attention and MLP too)."""

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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch):
        """Returns `(h, residual)`: the layer's output is `h + residual`, summed by the next norm."""
        if self.sandwich:
            h = self.self_attn(self.input_layernorm(x, residual)[0], batch)
            h, x = self.pre_feedforward_layernorm(self.post_attention_layernorm(h)[0], residual if residual is not None else x)
            return self.post_feedforward_layernorm(self.mlp(h))[0], x
        qkv, residual = self.input_layernorm.linear(x, residual, self.self_attn.qkv_proj)
        h = self.self_attn.attend(qkv, batch)
        gated, residual = self.post_attention_layernorm.linear(h, residual, self.mlp.gate_up_proj, self.mlp.activation)
        return self.mlp.down(gated), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        # Given an uninitialised table: a random init on the meta device would import torch._dynamo (0.15 GiB).
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size,
                                         _weight=torch.empty(spec.vocab_size, spec.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.gemma_norms)
        self.embed_scale = spec.embed_scale

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        return self.norm(x, residual)[0]


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
