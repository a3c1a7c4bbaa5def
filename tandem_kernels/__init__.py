"""Attention and KV-cache kernels. Each Triton kernel has a plain-torch reference beside it, which
is the CPU path and the test oracle; tensors on CUDA take the Triton kernels."""
from __future__ import annotations

import torch

from tandem_kernels import reference
from tandem_kernels.metadata import AttentionMetadata, build_metadata

__all__ = ["AttentionMetadata", "build_metadata", "paged_attention", "store_kv", "add_rmsnorm", "rotary_",
           "rope_store_kv", "act_mul", "linear", "norm_linear", "gated_linear", "top_values"]


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    if k_cache.is_cuda:
        from tandem_kernels.triton_kv import store_kv as triton_store_kv

        return triton_store_kv(k_cache, v_cache, k, v, slots)
    return reference.store_kv(k_cache, v_cache, k, v, slots)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
    if not q.is_cuda:
        return reference.paged_attention(q, k_cache, v_cache, meta, scale, window)
    from tandem_kernels.triton_decode import decode_attention
    from tandem_kernels.triton_extend import extend_attention

    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale, window,
                         meta.num_splits, out=out[:nd])
    if meta.num_extend:
        extend_attention(q[nd:], k_cache, v_cache, meta.block_tables[nd:], meta.cu_q, meta.seq_lens[nd:],
                         meta.max_q_len, scale, window, out=out[nd:])
    return out


def add_rmsnorm(x, residual, weight, eps: float, offset: bool = False):
    if x.is_cuda:
        from tandem_kernels.triton_norm_rope import add_rmsnorm as triton_add_rmsnorm

        return triton_add_rmsnorm(x, residual, weight, eps, offset)
    return reference.add_rmsnorm_ref(x, residual, weight, eps, offset)


def rotary_(x, cos, sin, positions):
    if x.is_cuda:
        from tandem_kernels.triton_norm_rope import rotary_ as triton_rotary

        return triton_rotary(x, cos, sin, positions)
    return reference.rotary_ref(x, cos, sin, positions)


def rope_store_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slots) -> None:
    """`rotary_` on q and k, then `store_kv`, in one launch on CUDA."""
    if q.is_cuda:
        from tandem_kernels.triton_kv import rope_store_kv as triton_rope_store_kv

        return triton_rope_store_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    return reference.rope_store_kv_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots)


def act_mul(gate_up, activation: str):
    if gate_up.is_cuda:
        from tandem_kernels.triton_act import act_mul as triton_act_mul

        return triton_act_mul(gate_up, activation)
    return reference.act_mul_ref(gate_up, activation)


def _one_half_row(x: torch.Tensor) -> bool:
    return x.is_cuda and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """`layer(x)`; a single half-precision row on CUDA (the batch-1 decode step) takes the Triton GEMV."""
    if _one_half_row(x):
        from tandem_kernels.triton_gemv import gemv

        return gemv(x, layer.weight, layer.bias)
    return layer(x)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                offset: bool, layer: torch.nn.Linear, act: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(layer(norm(x + residual)), x + residual)`, with `act` then `act_mul` on the result. For a single
    half-precision row on CUDA, the norm runs inside the projection's kernel where that pays. The residual
    is not updated in place there; use the one returned."""
    if _one_half_row(x) and act is None:
        from tandem_kernels.triton_gemv import norm_gemv, prologue_pays

        if prologue_pays(*layer.weight.shape):
            return norm_gemv(x, residual, norm_weight, eps, offset, layer.weight, layer.bias)
    h, residual = add_rmsnorm(x, residual, norm_weight, eps, offset)
    return gated_linear(h, layer, act), residual


def gated_linear(x: torch.Tensor, layer: torch.nn.Linear, act: str | None) -> torch.Tensor:
    """`act_mul(layer(x), act)` (just `layer(x)` without `act`); one launch for a single half-precision row
    on CUDA where that pays."""
    if act is None:
        return linear(x, layer)
    if _one_half_row(x) and layer.bias is None:
        from tandem_kernels.triton_gemv import epilogue_pays, gemv

        if epilogue_pays(x.shape[-1]):
            return gemv(x, layer.weight, gated=act)
    return act_mul(linear(x, layer), act)


def top_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k largest values of a 2-D `x`, in fp32, largest first."""
    if x.is_cuda and x.stride(-1) == 1:
        from tandem_kernels.triton_topk import DEFAULT_CHUNK, top_values as triton_top_values

        if 2 * k <= DEFAULT_CHUNK:
            return triton_top_values(x, k)
    return reference.top_values_ref(x, k)
