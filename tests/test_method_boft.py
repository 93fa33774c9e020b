"""BOFT: butterfly factors against a hand-written dense reference, PEFT's config and layer rules, block dropout.

The common checks and checkpoint interop both ways run for the `boft-*` rows of tests/cases.py (interop only for one
butterfly factor: HF PEFT builds more only with its CUDA extension); init, training (with dropout) and sharded
parity in tests/test_methods_interop.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from models import build
from torch import nn

import dpeft

peft = pytest.importorskip("peft")


def _reference_matrix(boft_r: torch.Tensor, dim: int) -> torch.Tensor:
    """M = B_{m-1} ... B_0, B_k = P_k blockdiag(Cayley(skew(A_kj))) P_k^T, all dense; P_k from PEFT's own
    permutation helper, everything else from the paper's definition."""
    from peft.tuners.boft.layer import BOFTLayer

    m, d, b, _ = boft_r.shape
    total = torch.eye(dim)
    for k in range(m):
        blocks = []
        for a in boft_r[k]:
            s = 0.5 * (a - a.T)
            blocks.append((torch.eye(b) - s) @ torch.inverse(torch.eye(b) + s))
        perm = BOFTLayer.block_butterfly_perm(None, dim, d // 2**k, b // 2, m - 1)
        p = torch.zeros(dim, dim)
        p[torch.arange(dim), perm] = 1.0
        total = p @ torch.block_diag(*blocks) @ p.T @ total
    return total


@pytest.mark.parametrize(("block_size", "factors"), [(2, 3), (4, 2), (4, 1)])
def test_butterfly_matches_dense_reference(block_size, factors):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 6))
    weight, bias = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    config = dpeft.BOFTConfig(
        target_modules=["0"], boft_block_size=block_size, boft_n_butterfly_factor=factors, init_weights=False
    )
    model = dpeft.get_peft_model(base, config).eval()
    state = dpeft.get_peft_model_state_dict(model)
    boft_r, boft_s = state["base_model.model.0.boft_R"], state["base_model.model.0.boft_s"]
    assert boft_r.shape == (factors, 16 // block_size, block_size, block_size) and boft_s.shape == (6, 1)
    rot = _reference_matrix(boft_r, 16)
    assert_close(rot @ rot.T, torch.eye(16), atol=1e-5)
    x = torch.randn(5, 16)
    expected = (x @ rot @ weight.T) * boft_s.T + bias
    assert_close(model(x), expected, atol=1e-5)
    merged = model.merge_and_unload()
    assert_close(merged[0].weight, boft_s * (weight @ rot.T), atol=1e-5)


def test_general_path_equals_fused_path():
    """With a forward hook on the base layer the wrapper takes the general path (delta of the output)."""
    torch.manual_seed(0)
    config = dpeft.BOFTConfig(
        target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False
    )
    model = dpeft.get_peft_model(build("mlp")[0], config).eval()
    x = torch.randn(4, 10)
    fused = model(X=x)
    handle = model.base_model.model.lin1.base_layer.register_forward_hook(lambda *a: None)
    try:
        general = model(X=x)
    finally:
        handle.remove()
    assert_close(general, fused, atol=1e-5)


def test_config_and_layer_rules():
    with pytest.raises(ValueError, match="exactly one of"):
        dpeft.BOFTConfig(target_modules=["lin0"], boft_block_size=2, boft_block_num=2)
    with pytest.raises(ValueError, match="exactly one of"):
        dpeft.BOFTConfig(target_modules=["lin0"], boft_block_size=0)
    with pytest.raises(ValueError, match="boft_n_butterfly_factor"):
        dpeft.BOFTConfig(target_modules=["lin0"], boft_n_butterfly_factor=0)
    with pytest.raises(ValueError, match="bias"):
        dpeft.BOFTConfig(target_modules=["lin0"], bias="lora_only")
    # lin0 has 10 inputs: not divisible by 4, nor (for 2 factors of size 2) by 2 * 2.
    for kwargs in (dict(boft_block_size=4), dict(boft_block_size=2, boft_n_butterfly_factor=2)):
        model = build("mlp")[0]
        with pytest.raises(ValueError, match="lin0"):
            dpeft.get_peft_model(model, dpeft.BOFTConfig(target_modules=["lin0"], **kwargs))
        assert not any("boft" in n for n, _ in model.named_modules()), "a failed injection left adapter modules"
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("emb_conv1d")[0], dpeft.BOFTConfig(target_modules=["conv1d", "emb"]))


def test_block_dropout_sets_blocks_to_identity_in_training_only():
    torch.manual_seed(0)
    config = dpeft.BOFTConfig(target_modules=["lin1"], boft_block_size=2, boft_dropout=0.5, init_weights=False)
    model = dpeft.get_peft_model(build("mlp")[0], config)
    layer = model.base_model.model.lin1
    method, p = layer.methods["default"], layer.store.get(layer.entries["default"])
    eye = torch.eye(2)
    dropped = [(b - eye).abs().max() < 1e-7 for b in method._blocks(p, training=True)[0]]
    assert sum(dropped) == 5  # int(0.5 * 10) blocks become the identity
    assert not any((b - eye).abs().max() < 1e-7 for b in method._blocks(p, training=False)[0])


def test_unmerge_restores_the_base_weight():
    base, _ = build("llama")
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = dpeft.BOFTConfig(
        target_modules=["q_proj"], boft_block_size=4, boft_n_butterfly_factor=3, init_weights=False
    )
    model = dpeft.get_peft_model(base, config)
    model.merge_adapter()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.base_layer.weight - weight).abs().max() > 1e-3
    model.unmerge_adapter()
    assert_close(q.base_layer.weight, weight, atol=1e-5)


def test_several_active_adapters_multiply_with_two_butterfly_factors():
    """``set_adapter(["a", "b"])`` with two butterfly factors (PEFT needs its CUDA extension for those; the PEFT
    comparison with one factor is in test_method_hra.py): y = s_a s_b (x M_b M_a W^T) + bias, a dense reference."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 6))
    weight, bias = base[0].weight.detach().clone(), base[0].bias.detach().clone()

    def config():
        return dpeft.BOFTConfig(target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False)

    model = dpeft.get_peft_model(base, config())
    model.add_adapter("b", config())
    model.eval()
    rot, scale = {}, {}
    for name in ("default", "b"):
        state = dpeft.get_peft_model_state_dict(model, adapter_name=name)
        rot[name], scale[name] = (
            _reference_matrix(state["base_model.model.0.boft_R"], 16),
            state["base_model.model.0.boft_s"],
        )
    x = torch.randn(5, 16)
    model.base_model.set_adapter(["default", "b"])
    expected = (x @ rot["b"] @ rot["default"] @ weight.T) * (scale["default"] * scale["b"]).T + bias
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5)
        model.merge_adapter(["default", "b"])
        assert_close(model(x), expected, atol=1e-5)
