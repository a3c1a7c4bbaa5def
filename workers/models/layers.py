"""Building blocks of the decoder: norms, rotary embedding, MLP."""
from __future__ import annotations

import torch
from torch import nn

import tandem_kernels as kernels


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

    def linear(self, x: torch.Tensor, residual: torch.Tensor | None, layer: nn.Linear,
               act: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(layer(norm(x + residual)), x + residual)`, then `act(gate) * up` with `act`; fused where
        `kernels.norm_linear` can."""
        return kernels.norm_linear(x, residual, self.weight, self.eps, self.offset, layer, act)


def rotary_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables' rows for `apply_rotary`: `cos` as is, `sin` with its first half negated (what
    transformers' `rotate_half` negates), so that rotating is a swap of halves and no negation."""
    half = sin.shape[-1] // 2
    s = sin[positions]
    return cos[positions], torch.cat((-s[:, :half], s[:, half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x `[T, heads, d]`; cos/signed_sin `[T, d]` from `rotary_rows`, already in x's dtype. Same roundings as
    transformers' `x * cos + rotate_half(x) * sin`."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (swapped * signed_sin[:, None, :]).add_(x * cos[:, None, :])


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        if activation not in kernels.reference.ACTIVATIONS:
            raise ValueError(f"unsupported activation {activation!r}; known: {sorted(kernels.reference.ACTIVATIONS)}")
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(kernels.gated_linear(x, self.gate_up_proj, self.activation))

    def down(self, gated: torch.Tensor) -> torch.Tensor:
        return kernels.linear(gated, self.down_proj)
