"""HRA: the math against a hand-written reference (plain and Gram-Schmidt), init and PEFT's config and layer rules.

The common checks and checkpoint interop both ways run for the `hra-*` rows of tests/cases.py; init, training and
sharded parity in tests/test_methods_interop.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, out
from models import build
from torch import nn

import dpeft


def _reference_h(u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """H = prod_i (I - 2 u_i u_i^T) over unit columns, or I - 2 Q Q^T with Q from a QR of the columns."""
    dim, r = u.shape
    if gram_schmidt:
        q, rr = torch.linalg.qr(u)
        q = q * torch.sign(torch.diagonal(rr))  # QR's columns up to sign; Gram-Schmidt keeps positive diagonals
        return torch.eye(dim) - 2 * q @ q.T
    h = torch.eye(dim)
    for i in range(r):
        v = u[:, i : i + 1] / u[:, i].norm()
        h = h @ (torch.eye(dim) - 2 * v @ v.T)
    return h


@pytest.mark.parametrize("gram_schmidt", [False, True])
def test_linear_matches_hand_written_reference(gram_schmidt):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 7))
    weight, bias = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    config = dpeft.HRAConfig(target_modules=["0"], r=3, apply_GS=gram_schmidt, init_weights=False)
    model = dpeft.get_peft_model(base, config).eval()
    u = dpeft.get_peft_model_state_dict(model)["base_model.model.0.hra_u"]
    assert u.shape == (12, 3)
    h = _reference_h(u, gram_schmidt)
    assert_close(h @ h.T, torch.eye(12), atol=1e-5)
    x = torch.randn(5, 12)
    assert_close(model(x), x @ (weight @ h).T + bias, atol=1e-5)
    merged = model.merge_and_unload()
    assert_close(merged[0].weight, weight @ h, atol=1e-5)


def test_default_init_is_the_identity_for_even_r_only():
    base, kw = build("conv2d")
    ref = out(base, kw)
    model = dpeft.get_peft_model(base, dpeft.HRAConfig(target_modules=["conv2d", "conv2d_1x1"], r=4))
    assert_close(out(model, kw), ref, atol=1e-5)  # pairs of reflections cancel up to rounding
    u = dpeft.get_peft_model_state_dict(model)["base_model.model.conv2d.hra_u"]
    assert torch.equal(u[:, 0], u[:, 1]) and not torch.equal(u[:, 1], u[:, 2])
    with pytest.warns(UserWarning, match="even r"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.HRAConfig(target_modules=["lin0"], r=3))


def test_config_and_layer_rules():
    with pytest.raises(ValueError, match="r must be"):
        dpeft.HRAConfig(target_modules=["lin0"], r=0)
    with pytest.raises(ValueError, match="bias"):
        dpeft.HRAConfig(target_modules=["lin0"], bias="lora_only")
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("emb_conv1d")[0], dpeft.HRAConfig(target_modules=["conv1d", "emb"]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        dpeft.get_peft_model(grouped, dpeft.HRAConfig(target_modules=["0"], r=2))
    assert not any("hra" in n for n, _ in grouped.named_modules())


@pytest.mark.parametrize("gram_schmidt", [False, True])
def test_unmerge_restores_the_base_weight(gram_schmidt):
    base, _ = build("llama")
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = dpeft.HRAConfig(target_modules=["q_proj"], r=5, apply_GS=gram_schmidt, init_weights=False)
    model = dpeft.get_peft_model(base, config)
    model.merge_adapter()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.base_layer.weight - weight).abs().max() > 1e-3
    model.unmerge_adapter()
    assert_close(q.base_layer.weight, weight, atol=1e-5)


# ------------------------------------------------------------------------------ several active adapters on one layer
# (BOFT too: both compose through the weight, `MethodLayer.composes_through_weight`.)
MULTI_CASES = [
    pytest.param(
        "llama",
        lambda: dpeft.HRAConfig(target_modules=["q_proj", "down_proj"], r=3, init_weights=False),
        id="hra-llama",
    ),
    pytest.param(
        "llama",
        lambda: dpeft.HRAConfig(target_modules=["q_proj", "v_proj"], r=2, apply_GS=True, init_weights=False),
        id="hra-gram-schmidt",
    ),
    pytest.param(
        "conv2d", lambda: dpeft.HRAConfig(target_modules=["conv2d"], r=2, init_weights=False), id="hra-conv2d"
    ),
    pytest.param(
        "llama",
        lambda: dpeft.BOFTConfig(
            target_modules=["q_proj", "down_proj"], boft_block_size=4, init_weights=False
        ),  # one butterfly factor: PEFT builds more only with its CUDA extension (test_method_boft.py: two)
        id="boft-llama",
    ),
    pytest.param(
        "conv2d",
        lambda: dpeft.BOFTConfig(target_modules=["conv2d"], boft_block_size=5, init_weights=False),
        id="boft-conv2d",
    ),
]


@pytest.mark.parametrize(("model_name", "factory"), MULTI_CASES)
def test_several_active_adapters_compose_as_in_peft(model_name, factory, tmp_path):
    """``set_adapter(["a", "b"])``: PEFT multiplies the rotations (W H_a H_b for HRA; s_a s_b W M_a^T M_b^T for
    BOFT), i.e. merging a, then b. dpeft's outputs equal PEFT's in both orders, and merging equals the forward."""
    import warnings

    from conftest import peft_config_of

    peft = pytest.importorskip("peft")
    _, kw = build(model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = peft.get_peft_model(build(model_name)[0], peft_config_of(factory()))
        theirs.add_adapter("b", peft_config_of(factory()))
        theirs.save_pretrained(tmp_path)
    ours = dpeft.PeftModel.from_pretrained(build(model_name)[0], tmp_path)
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()
    outputs = []
    for order in (["default", "b"], ["b", "default"]):
        ours.base_model.set_adapter(order)
        theirs.base_model.set_adapter(order)
        with torch.no_grad():
            expected = out(theirs, kw)
            assert_close(out(ours, kw), expected, atol=1e-5, msg=str(order))
            ours.merge_adapter(order)
            assert_close(out(ours, kw), expected, atol=1e-5, msg=f"merged {order}")
            ours.unmerge_adapter()
        outputs.append(expected)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4, "the two orders should differ"
