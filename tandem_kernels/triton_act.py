"""Triton: the gated MLP's activation and product, `act(gate) * up`, read from the fused gate_up rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}


@triton.jit
def _act_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < n
    g = tl.load(x_ptr + t * stride_x + c, mask=mask, other=0.0)
    u = tl.load(x_ptr + t * stride_x + n + c, mask=mask, other=0.0)
    tl.store(out_ptr + t * stride_o + c, act_times(g, u, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_times(g, u, ACT: tl.constexpr):
    """`act(g) * u` in fp32, act(g) rounded to the input dtype before the product, as the unfused torch ops do."""
    gf = g.to(tl.float32)
    if ACT == 0:
        a = gf / (1.0 + tl.exp(-gf))
    elif ACT == 1:
        inner = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        a = gf / (1.0 + tl.exp(-2.0 * inner))          # 0.5 g (1 + tanh(inner))
    else:
        a = 0.5 * gf * (1.0 + tl.erf(gf * 0.7071067811865476))
    return a.to(u.dtype).to(tl.float32) * u.to(tl.float32)


def act_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """`[T, 2I]` (gate then up) -> `[T, I]`."""
    t, two_n = gate_up.shape
    assert gate_up.stride(1) == 1 and two_n % 2 == 0
    n = two_n // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _act_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                    ACT=ACTS[activation], BLOCK=block)
    return out
