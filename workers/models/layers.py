"""Building blocks of the decoder: norms, rotary embedding, MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class RMSNorm(nn.Module):
    """Llama-style `w * norm(x)` or, with `offset`, Gemma-style `(1 + w) * norm(x)` computed in fp32.
    With a residual: adds x into it in place and returns `(norm(residual), residual)`."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim) if not offset else torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.add_rmsnorm(x, residual, self.weight, self.eps, self.offset)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[T, heads, d]`, cos/sin `[T, d]` already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = kernels.linear(x, self.gate_up_proj)
        if gate_up.is_cuda:
            return kernels.linear(kernels.act_mul(gate_up, self.activation), self.down_proj)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)
