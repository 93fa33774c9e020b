"""MiSS beyond the case table: the three variants against hand-written references, the zero-initialised "bat" and
"mini" variants through checkpoints (both ways with HF PEFT) and merges on perturbed adapters, and refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, out, peft_config_of
from models import build

import dpeft

peft = pytest.importorskip("peft")

VARIANTS = [
    pytest.param("mlp", {"target_modules": ["lin0", "lin1"], "r": 5, "init_weights": "bat"}, id="bat"),
    pytest.param("mlp", {"target_modules": ["lin0", "lin1"], "r": 4, "init_weights": "mini", "mini_r": 5}, id="mini"),
    pytest.param("llama", {"r": 8, "init_weights": "bat", "task_type": "CAUSAL_LM"}, id="bat-llama"),
]


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=g) * 0.1)


def _layer(block: torch.Tensor, mode, r: int = 4):
    config = dpeft.MissConfig(target_modules=["lin0"], r=r, init_weights=mode, mini_r=block.shape[-1])
    model = dpeft.get_peft_model(build("mlp")[0], config).eval()
    layer = model.get_base_model().lin0
    with torch.no_grad():
        layer.get_parameter("miss_block.default").copy_(block)
    return layer


def test_default_form_matches_reference():
    """y = W x + b + sum_j x[j r:(j+1) r] B, x zero-padded to a multiple of r (10 inputs, r=4: a partial slice)."""
    block = torch.randn(4, 20)
    layer = _layer(block, True)
    x = torch.randn(3, 10)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    padded = torch.cat([x, torch.zeros(3, 2)], dim=1)
    expected = x @ W.T + b + sum(padded[:, j * 4 : (j + 1) * 4] @ block for j in range(3))
    assert_close(layer(x), expected)
    delta = torch.zeros(20, 10)
    for col in range(10):
        delta[:, col] = block[col % 4]
    assert_close(layer.get_delta_weight("default"), delta)


def test_mini_repeats_the_block_along_out_features():
    block = torch.randn(4, 5)
    layer = _layer(block, "mini")
    assert_close(layer.get_delta_weight("default"), _layer(block.repeat(1, 4), True).get_delta_weight("default"))


def test_bat_updates_each_block():
    """Every (r, r) block W_ij (rows i, columns j) becomes W_ij + W_ij B_i + B_i; unmerging restores W."""
    r = 5
    blocks = torch.randn(4, r, r) * 0.1
    layer = _layer(blocks, "bat", r=r)
    W = layer.base_layer.weight.detach().clone()
    expected = W.clone()
    for i in range(4):
        for j in range(2):
            w = W[i * r : (i + 1) * r, j * r : (j + 1) * r]
            expected[i * r : (i + 1) * r, j * r : (j + 1) * r] = w + w @ blocks[i] + blocks[i]
    assert_close(W + layer.get_delta_weight("default"), expected)
    x = torch.randn(3, 10)
    assert_close(layer(x), x @ expected.T + layer.base_layer.bias.detach())
    layer.merge()
    assert_close(layer.base_layer.weight.detach(), expected)
    layer.unmerge()
    assert_close(layer.base_layer.weight.detach(), W, atol=1e-5)


@pytest.mark.parametrize(("model_name", "kw"), VARIANTS)
def test_variants_checkpoints_both_ways_and_merge(model_name, kw, tmp_path):
    base, inputs = build(model_name)
    reference = peft.get_peft_model(base, peft_config_of(dpeft.MissConfig(**kw)))
    _perturb(reference, seed=1)
    expected = out(reference.eval(), inputs)
    reference.save_pretrained(tmp_path / "theirs")
    ours = dpeft.PeftModel.from_pretrained(build(model_name)[0], tmp_path / "theirs")
    assert_close(out(ours, inputs), expected)

    model = dpeft.get_peft_model(build(model_name)[0], dpeft.MissConfig(**kw))
    _perturb(model, seed=2)
    model.eval()
    mine = out(model, inputs)
    model.save_pretrained(tmp_path / "ours")
    assert_close(out(peft.PeftModel.from_pretrained(build(model_name)[0], tmp_path / "ours"), inputs), mine)
    model.merge_adapter()
    assert_close(out(model, inputs), mine)
    model.unmerge_adapter()
    assert_close(out(model, inputs), mine)
    assert_close(out(model.merge_and_unload(), inputs), mine)


def test_refusals():
    with pytest.raises(ValueError, match="not layer types"):  # transformers Conv1D: PEFT has no MiSS form for it
        dpeft.get_peft_model(build("emb_conv1d")[0], dpeft.MissConfig(target_modules=["conv1d"], r=1))
    with pytest.raises(ValueError, match="less than or equal to in_features"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.MissConfig(target_modules=["lin0"], r=11))
    with pytest.raises(ValueError, match=r"into \[r, r\]"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.MissConfig(target_modules=["lin0"], r=4, init_weights="bat"))
    with pytest.raises(ValueError, match="mini_r"):
        dpeft.get_peft_model(
            build("mlp")[0], dpeft.MissConfig(target_modules=["lin0"], r=4, init_weights="mini", mini_r=3)
        )
    with pytest.raises(ValueError, match="init_weights"):
        dpeft.MissConfig(init_weights="gaussian")
