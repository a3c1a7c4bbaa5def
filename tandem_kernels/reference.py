"""Plain-torch references: the CPU path and the oracle of the Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem_kernels.metadata import AttentionMetadata


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new K/V rows `[T, kv_heads, d]` into caches `[blocks, block_size, kv_heads, d]` at `slots`."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the step's queries `[T, heads, d]` over each sequence's cached K/V.
    The CPU path: decode rows batched together, each extend sequence in its own SDPA call."""
    out = torch.empty_like(q)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    gqa = q.shape[1] != k_cache.shape[2]
    nd = meta.num_decode
    if nd:
        # One query per row: plain fp32 batched matmuls beat CPU SDPA (by 6-17x in bf16) at these shapes.
        slots = meta.memo("decode_slots", lambda: _decode_slots(meta))
        kv_heads = k_cache.shape[2]
        group, n = q.shape[1] // kv_heads, slots.shape[1]
        qf = q[:nd].float().reshape(nd * kv_heads, group, q.shape[2])
        bias = meta.memo(("decode_bias", window), lambda: _decode_bias(meta, n, window, kv_heads))
        keys = _decode_rows(k_flat, slots).view(nd * kv_heads, n, -1).transpose(1, 2)
        scores = torch.baddbmm(bias.expand(-1, group, -1), qf, keys, alpha=scale)
        probs = scores.softmax(-1)
        out[:nd] = torch.bmm(probs, _decode_rows(v_flat, slots).view(nd * kv_heads, n, -1)).view(nd, *q.shape[1:])
    cu, lens = meta.host("cu_q"), meta.host("seq_lens")
    for i in range(meta.num_extend):
        a, b, ctx = nd + cu[i], nd + cu[i + 1], lens[nd + i]
        slots = meta.memo(("extend_slots", i), lambda: _slots(meta.block_tables[nd + i], ctx, meta.page_size))
        k = k_flat.index_select(0, slots).transpose(0, 1)[None]
        v = v_flat.index_select(0, slots).transpose(0, 1)[None]
        qs = q[a:b].transpose(0, 1)[None]
        if b - a == ctx and window is None:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            mask = meta.memo(("extend_mask", i, window), lambda: _causal_mask(ctx, b - a, window, q.device))
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[a:b] = o[0].transpose(0, 1)
    return out


def _decode_rows(flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """fp32 `[nd, kv_heads, n, d]` of the cache rows at `slots` `[nd, n]`: `index_select` over flat rows (several
    times faster than advanced indexing), the head transpose riding on the dtype conversion's one copy."""
    nd, n = slots.shape
    rows = flat.index_select(0, slots.view(-1)).view(nd, n, *flat.shape[1:])
    return torch.empty((nd, flat.shape[1], n, flat.shape[2]), dtype=torch.float32).copy_(rows.permute(0, 2, 1, 3))


def _slots(block_table: torch.Tensor, length: int, page: int) -> torch.Tensor:
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // page].long() * page + pos % page


def _decode_slots(meta: AttentionMetadata) -> torch.Tensor:
    nd = meta.num_decode
    n_keys = max(meta.host("seq_lens")[:nd])
    pos = torch.arange(n_keys, device=meta.block_tables.device)
    table = meta.block_tables[:nd, : -(-n_keys // meta.page_size)].long()
    return table[:, pos // meta.page_size] * meta.page_size + pos % meta.page_size


def _decode_bias(meta: AttentionMetadata, n_keys: int, window: int | None, kv_heads: int) -> torch.Tensor:
    """`[nd * kv_heads, 1, n_keys]`: 0 where the row's query sees the key, -inf where it does not."""
    j = torch.arange(n_keys, device=meta.seq_lens.device)
    q = (meta.seq_lens[: meta.num_decode].long() - 1)[:, None]
    mask = j[None, :] <= q
    if window is not None:
        mask &= j[None, :] > q - window
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    return bias.repeat_interleave(kv_heads, 0)[:, None, :]


def _causal_mask(ctx: int, q_len: int, window: int | None, device) -> torch.Tensor:
    q = torch.arange(ctx - q_len, ctx, device=device)[:, None]
    j = torch.arange(ctx, device=device)[None, :]
    mask = j <= q
    if window is not None:
        mask &= j > q - window
    return mask[None]


def _gather_keys(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    page = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    slots = block_table[pos // page].long() * page + pos % page
    return cache.reshape(-1, *cache.shape[2:])[slots], slots


def _attend(q, k, v, q_pos, k_pos, scale, window):
    """q `[m, heads, d]`, k/v `[n, kv_heads, d]`, fp32 math; a row with nothing to attend is zero."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    valid = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        valid &= k_pos[None, :] > q_pos[:, None] - window
    scores = scores.masked_fill(~valid[None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("hmn,nhd->mhd", probs, v)


def decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, window=None, kv_pos=None):
    """Oracle of `triton_decode.decode_attention`."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        k, slots = _gather_keys(k_cache, block_tables[b], n)
        v, _ = _gather_keys(v_cache, block_tables[b], n)
        k_pos = kv_pos.reshape(-1)[slots].long() if kv_pos is not None else torch.arange(n, device=q.device)
        q_pos = torch.tensor([n - 1], device=q.device)
        out[b] = _attend(q[b : b + 1], k, v, q_pos, k_pos, scale, window)[0].to(q.dtype)
    return out


def extend_attention_ref(q, k_cache, v_cache, block_tables, cu_q, seq_lens, scale, window=None, kv_pos=None):
    """Oracle of `triton_extend.extend_attention`."""
    out = torch.zeros_like(q)
    for s in range(seq_lens.shape[0]):
        a, b, n = int(cu_q[s]), int(cu_q[s + 1]), int(seq_lens[s])
        k, slots = _gather_keys(k_cache, block_tables[s], n)
        v, _ = _gather_keys(v_cache, block_tables[s], n)
        k_pos = kv_pos.reshape(-1)[slots].long() if kv_pos is not None else torch.arange(n, device=q.device)
        q_pos = torch.arange(n - (b - a), n, device=q.device)
        out[a:b] = _attend(q[a:b], k, v, q_pos, k_pos, scale, window).to(q.dtype)
    return out


def store_kv_ref(k_cache, v_cache, k, v, slots) -> None:
    """Oracle of `triton_kv.store_kv`: slot -1 is padding."""
    keep = slots >= 0
    store_kv(k_cache, v_cache, k[keep], v[keep], slots[keep])


def add_rmsnorm_ref(x, residual, weight, eps, offset=False):
    """Oracle of `triton_norm_rope.add_rmsnorm` (same dtype semantics as transformers' norms)."""
    if residual is not None:
        residual.add_(x)
        x = residual
    if offset:
        return (F.rms_norm(x.float(), x.shape[-1:], eps=eps) * (1.0 + weight.float())).to(x.dtype), x
    return weight * F.rms_norm(x, x.shape[-1:], eps=eps), x   # fp32 inside, rounded once: as transformers


def rotary_ref(x, cos, sin, positions):
    """Oracle of `triton_norm_rope.rotary_`; cos/sin tables hold both halves, as transformers builds them."""
    half = x.shape[-1] // 2
    c, s = cos[positions][:, None, :half].float(), sin[positions][:, None, :half].float()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    return x


def rope_store_kv_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots) -> None:
    """Oracle of `triton_kv.rope_store_kv`."""
    rotary_ref(q, cos, sin, positions)
    rotary_ref(k, cos, sin, positions)
    store_kv_ref(k_cache, v_cache, k, v, slots)


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def act_mul_ref(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """Oracle of `triton_act.act_mul`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate).mul_(up)


def top_values_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """Oracle of `triton_topk.top_values`: each row's k largest values in fp32, largest first."""
    return x.float().topk(k, dim=-1).values
