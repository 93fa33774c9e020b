"""Fused forward/backward of a frozen `nn.Linear` with one LoRA (or DoRA) adapter on it.

Autograd on the unfused graph allocates, per layer and step, a separate base output, LoRA output and sum in
forward, and two input gradients plus their sum in backward; on CPU each fresh activation-sized buffer costs a
page-faulting allocation and a memory pass. Here the base GEMM and the rank-r update write into one buffer
(``addmm_``) and the input gradient of the base and of the adapter accumulate into one buffer as well. The math is
the same as the unfused path up to float rounding:

    LoRA:  y = x W^T + b + s (x A^T) B^T
    DoRA:  y = g * (x W^T + s (x A^T) B^T) + b       with g = m / ||W + s B A|| per output row (norm detached)

Only used where the base weight and bias are frozen and no dropout applies (see `LoraLayer.fused_forward`).
"""

from __future__ import annotations

import torch


class LoraLinearFn(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with W and b frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        hidden = x2.mm(lora_a.t())
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2.mm(weight.t())
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, hidden = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_hidden = g2.mm(lora_b).mul_(s)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(weight).addmm_(grad_hidden, lora_a).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_a = grad_hidden.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[4]:
            grad_b = g2.t().mm(hidden).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None


class DoraLinearFn(torch.autograd.Function):
    """``g * (x W^T + s (x A^T) B^T) + b`` with W and b frozen; gradients for x, A, B and the row gain g."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, gain, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        hidden = x2.mm(lora_a.t())
        t = x2.mm(weight.t()).addmm_(hidden, lora_b.t(), alpha=scaling)
        out = torch.addcmul(bias, t, gain) if bias is not None else t * gain
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, gain, t if ctx.needs_input_grad[5] else None)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, hidden, gain, t = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        # The gradient reaching t is grad * gain (per output column); fold the gain into the small factors
        # (B, and W or the gradient, whichever is smaller) instead of materialising it.
        row_gain = gain.unsqueeze(1)
        grad_hidden = g2.mm(lora_b * (row_gain * s))
        grad_x = grad_a = grad_b = grad_gain = None
        if ctx.needs_input_grad[0]:
            if weight.shape[1] <= g2.shape[0]:
                grad_x = g2.mm(weight * row_gain)
            else:
                grad_x = (g2 * gain).mm(weight)
            grad_x = grad_x.addmm_(grad_hidden, lora_a).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_a = grad_hidden.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[4]:
            grad_b = g2.t().mm(hidden).mul_(row_gain * s)
        if ctx.needs_input_grad[5]:
            grad_gain = _column_dots(g2, t)
        return grad_x, None, None, grad_a, grad_b, grad_gain, None


def _column_dots(a: torch.Tensor, b: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """``(a * b).sum(0)`` in blocks of rows: no activation-sized temporary (a fresh one costs page faults on CPU)."""
    n = a.shape[0]
    if n <= rows:
        return (a * b).sum(0)
    out = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    block = torch.empty(rows, a.shape[1], dtype=a.dtype, device=a.device)
    for start in range(0, n, rows):
        part = block[: min(rows, n - start)]
        torch.mul(a[start : start + rows], b[start : start + rows], out=part)
        out.add_(part.sum(0))
    return out
