"""The fused LoRA/DoRA linear paths equal the general (unfused) path: outputs and every gradient.

The fused path is what a frozen `nn.Linear` with one active adapter runs; the general path is what the wrapper
runs when `fused_forward` returns None. Both must agree to float rounding, with and without a base bias, for
batches above and below the row block of DoRA's magnitude gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpeft
from dpeft.methods.lora import fused
from dpeft.methods.lora.dora import DoraLayer
from dpeft.methods.lora.layer import LoraLayer


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 40)
        self.b = nn.Linear(40, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _model(use_dora: bool) -> nn.Module:
    torch.manual_seed(0)
    config = dpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b"], use_dora=use_dora, init_lora_weights=False)
    model = dpeft.get_peft_model(_Net(), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]
    return (y.detach(), x.grad, *grads)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("rows", [6, 300])
def test_fused_equals_unfused(use_dora, rows, monkeypatch):
    model = _model(use_dora)
    x = torch.randn(rows, 24)
    calls = []
    fn = fused.DoraLinearFn if use_dora else fused.LoraLinearFn
    real = fn.apply
    monkeypatch.setattr(fn, "apply", lambda *a: calls.append(1) or real(*a))
    got = _run(model, x)
    assert len(calls) == 2, "both layers should take the fused path"
    monkeypatch.setattr(LoraLayer, "fused_forward", lambda *a: None)
    monkeypatch.setattr(DoraLayer, "fused_forward", lambda *a: None)
    want = _run(model, x)
    assert len(calls) == 2
    assert len(got) == len(want) == (2 + (6 if use_dora else 4))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fused_not_used_with_dropout_in_training(monkeypatch):
    torch.manual_seed(0)
    model = dpeft.get_peft_model(_Net(), dpeft.LoraConfig(r=4, target_modules=["a"], lora_dropout=0.5))
    calls = []
    real = fused.LoraLinearFn.apply
    monkeypatch.setattr(fused.LoraLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    model.train()
    model(torch.randn(3, 24))
    assert calls == []
    model.eval()  # dropout is off in eval, so the fused path applies again
    model(torch.randn(3, 24))
    assert calls == [1]


def test_column_dots_matches_product_sum():
    for n in (1, 127, 128, 129, 300):
        a, b = torch.randn(n, 7, dtype=torch.float64), torch.randn(n, 7, dtype=torch.float64)
        torch.testing.assert_close(fused._column_dots(a, b), (a * b).sum(0))
