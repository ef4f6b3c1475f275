"""The linear products and the dense SwiGLU feed-forward the decoder's blocks (and the MoE experts) are made of."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unigen.models.quantize import quantized_linear

SKINNY_ROWS = 64  # up to this many rows, linear()'s weight-on-the-left product is the faster one on CPU


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with the few-row products of decode steps computed as ``weight @ x.T`` on CPU.

    MKL computes ``weight @ x.T`` much faster than ``x @ weight.T`` when x has few rows, and its even-column
    kernels read a streamed weight faster, so an odd row count gets its last row repeated (docs/PERFORMANCE.md).
    From a few hundred rows on, in bfloat16 and on GPUs the usual form is as fast or faster.
    """
    if type(weight) not in (nn.Parameter, torch.Tensor):  # a quantized weight (torchao's tensor subclass)
        return quantized_linear(x, weight, bias)
    if not x.is_cpu or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows % 2:
        flat = torch.cat([flat, flat[-1:]])
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
    return out[:, :rows].t().contiguous().view(*x.shape[:-1], weight.shape[0])


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` through a linear layer: :func:`linear` for a plain ``nn.Linear``; a wrapped layer (PEFT's LoRA
    layers) through its own forward, so that an adapter attached by the stock ``PeftModel`` is applied."""
    if type(layer) is nn.Linear:
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def swiglu_into(out: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                scale: float = 1.0) -> None:
    """``out += scale * down @ (silu(gate) * up)`` with ``gate | up = gate_up @ x``, for one row ``x``, in place.

    Matrix-vector products: the MoE decode step's per-expert form, where its few, small weights are cache-resident and
    ``linear``'s doubled row costs more than it gains (docs/MOE.md)."""
    h = torch.mv(gate_up, x)
    half = h.shape[0] // 2
    out.addmv_(down, F.silu(h[:half]).mul_(h[half:]), alpha=scale)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate|up as one matmul."""

    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(width, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, x).chunk(2, dim=-1)
        return project(self.down_proj, F.silu(gate) * up)
