"""VB-LoRA: the math against a hand-written reference, the shared trainable vector bank, the
`save_only_topk_weights` checkpoint form and PEFT's config rules."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, out, perturbed
from models import build
from safetensors.torch import load_file

import dpeft

peft = pytest.importorskip("peft")


# ---------------------------------------------------------------------------------------------------- VB-LoRA
def test_vblora_math_matches_a_hand_written_reference():
    """Each length-L block of A (r, in) and B (out, r) is the softmax-weighted sum of its top-k bank vectors."""
    config = dpeft.VBLoRAConfig(target_modules=["lin0"], r=2, num_vectors=6, vector_length=5, topk=2)
    model = perturbed(dpeft.get_peft_model(build("mlp")[0], config))
    sd = dpeft.get_peft_model_state_dict(model)
    bank, la, lb = (
        sd[k]
        for k in (
            "base_model.vblora_vector_bank",
            *[f"base_model.model.lin0.{n}" for n in ("vblora_logits_A", "vblora_logits_B")],
        )
    )

    def block(logits):
        order = sorted(range(6), key=lambda j: -logits[j].item())[:2]
        w = torch.tensor([logits[j].item() for j in order]).exp()
        w = w / w.sum()
        return sum(w[t] * bank[j] for t, j in enumerate(order))

    a = torch.zeros(2, 10)
    for k in range(2):
        for blk in range(2):
            a[k, blk * 5 : blk * 5 + 5] = block(la[k, blk])
    b = torch.zeros(20, 2)
    for blk in range(4):
        for k in range(2):
            b[blk * 5 : blk * 5 + 5, k] = block(lb[blk, k])
    lin0 = model.base_model.model.lin0
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert_close(lin0(x), lin0.base_layer(x) + x @ a.T @ b.T, atol=1e-6)
        assert_close(lin0.get_delta_weight("default"), b @ a, atol=1e-6)


def test_vblora_bank_is_trainable_and_shared():
    model = dpeft.get_peft_model(
        build("mlp")[0], dpeft.VBLoRAConfig(target_modules=["lin0", "lin1"], num_vectors=8, vector_length=10)
    )
    bank = model.base_model.get_parameter("vblora_vector_bank.default")
    assert bank.requires_grad and model.base_model.model.lin1.get_parameter("vblora_vector_bank.default") is bank
    model.train()(torch.randn(2, 10)).sum().backward()
    assert bank.grad is not None and bank.grad.abs().sum() > 0


def test_vblora_topk_only_checkpoint_is_inference_only(tmp_path):
    config = dict(target_modules=["lin0", "lin1"], num_vectors=8, vector_length=10, topk=2)
    model = perturbed(dpeft.get_peft_model(build("mlp")[0], dpeft.VBLoRAConfig(save_only_topk_weights=True, **config)))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.lin0.vblora_logits_A"
    assert key not in saved and saved[key + "_topk_indices"].dtype == torch.uint8
    assert saved[key + "_topk_weights"].shape == (4, 1, 1)  # (r, in / L, topk - 1)
    loaded = dpeft.PeftModel.from_pretrained(build("mlp")[0], tmp_path, is_trainable=True)
    kw = {"X": torch.randn(3, 10)}
    assert_close(out(loaded.eval(), kw), out(model, kw), atol=1e-6)
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        out(loaded.train(), kw)


def test_vblora_config_rules():
    with pytest.raises(ValueError, match="topk"):
        dpeft.VBLoRAConfig(topk=0)
    with pytest.raises(ValueError, match="cannot exceed"):
        dpeft.VBLoRAConfig(topk=9, num_vectors=8)
    with pytest.raises(ValueError, match="divisible by `vector_length`"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.VBLoRAConfig(target_modules=["lin0"], vector_length=3))
    model = build("mlp")[0]
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError):
        dpeft.get_peft_model(model, dpeft.VBLoRAConfig(target_modules=["lin0", "lin2"], vector_length=5))
    assert [n for n, _ in model.named_modules()] == before, "a failed injection leaves the model as it was"
