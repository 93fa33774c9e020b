"""DeLoRA: the math against a hand-written reference, the frozen weight norms, and PEFT's config and layer rules.

The common checks and checkpoint interop both ways run for the `delora-*` rows of tests/cases.py; init, training
(with dropout) and sharded parity in tests/test_methods_interop.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from models import build
from torch import nn

import dpeft


def test_linear_matches_hand_written_reference():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 7))
    weight, bias = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    config = dpeft.DeloraConfig(target_modules=["0"], r=3, delora_lambda=4, init_weights=False)
    model = dpeft.get_peft_model(base, config).eval()
    state = {k.rsplit(".", 1)[-1]: v for k, v in dpeft.get_peft_model_state_dict(model).items()}
    a, b, lam, w_norm = state["delora_A"], state["delora_B"], state["delora_lambda"], state["delora_w_norm"]
    assert_close(w_norm, torch.linalg.norm(weight, dim=0), atol=0)
    assert lam.tolist() == [4.0]
    delta = torch.zeros(7, 12)
    for i in range(3):  # each rank-1 term normalised to norm lambda / r, then the input columns scaled
        term = torch.outer(b[:, i], a[i]) / (b[:, i].norm() * a[i].norm())
        delta += lam / 3 * term
    delta = delta * w_norm
    x = torch.randn(5, 12)
    assert_close(model(x), x @ (weight + delta).T + bias, atol=1e-5)
    assert_close(model.merge_and_unload()[0].weight, weight + delta, atol=1e-5)


def test_weight_norms_are_frozen_and_saved():
    base, _ = build("mlp")
    base_numel = sum(p.numel() for p in base.parameters())
    model = dpeft.get_peft_model(base, dpeft.DeloraConfig(target_modules=["lin0"], r=2, init_weights=False))
    key = "base_model.model.lin0.delora_w_norm"
    assert key in dpeft.get_peft_model_state_dict(model)
    assert not any("w_norm" in n for n, p in model.named_parameters() if p.requires_grad)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * 10 + 20 * 2 + 1 and total == trainable + base_numel


def test_default_init_changes_nothing_and_trains():
    torch.manual_seed(0)
    base, kw = build("mlp")
    ref = base(**kw)
    model = dpeft.get_peft_model(base, dpeft.DeloraConfig(target_modules=["lin0", "lin1"], r=4))
    assert_close(model(**kw), ref, atol=0)
    model.train()
    model(**kw).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("delora_B" in n and g.abs().sum() > 0 for n, g in grads.items()), "B gets a gradient at B = 0"


def test_config_and_layer_rules():
    with pytest.raises(ValueError, match="r must be"):
        dpeft.DeloraConfig(target_modules=["lin0"], r=0)
    with pytest.raises(ValueError, match="bias"):
        dpeft.DeloraConfig(target_modules=["lin0"], bias="lora_only")
    with pytest.raises(ValueError, match="module_dropout"):
        dpeft.DeloraConfig(target_modules=["lin0"], module_dropout=1.5)
    for model_name, targets in (("emb_conv1d", ["conv1d", "emb"]), ("conv2d", ["conv2d"])):
        with pytest.raises(ValueError, match="not layer types"):
            dpeft.get_peft_model(build(model_name)[0], dpeft.DeloraConfig(target_modules=targets))
