"""VeRA: the math against a hand-written reference, the shared (model-level) projections, `save_projection=False`
(regenerated projections, also in the merge tool) and PEFT's config rules."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, out, perturbed
from models import build
from safetensors.torch import load_file

import dpeft

peft = pytest.importorskip("peft")


# ---------------------------------------------------------------------------------------------------- VeRA
def test_vera_math_matches_a_hand_written_reference():
    """y = W x + b + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x))) with A, B shared and sliced per layer."""
    base, _ = build("mlp")
    model = perturbed(dpeft.get_peft_model(base, dpeft.VeraConfig(target_modules=["lin0", "lin1"], r=3)))
    sd = dpeft.get_peft_model_state_dict(model)
    a, b = sd["base_model.vera_A"], sd["base_model.vera_B"]
    assert a.shape == (3, 20) and b.shape == (20, 3), "sized by the largest in (20) and out (20) features"
    lin0 = model.base_model.model.lin0.base_layer
    x = torch.randn(4, 10)
    expected = torch.empty(4, 20)
    lb, ld = sd["base_model.model.lin0.vera_lambda_b"], sd["base_model.model.lin0.vera_lambda_d"]
    for n in range(4):
        for o in range(20):
            hidden = [ld[k] * sum(a[k, i] * x[n, i] for i in range(10)) for k in range(3)]
            expected[n, o] = lin0.bias[o] + sum(lin0.weight[o, i] * x[n, i] for i in range(10))
            expected[n, o] += lb[o] * sum(b[o, k] * hidden[k] for k in range(3))
    with torch.no_grad():
        assert_close(model.base_model.model.lin0(x), expected, atol=1e-5)


def test_vera_projections_are_one_shared_tensor_under_peft_paths():
    model = dpeft.get_peft_model(build("llama")[0], dpeft.VeraConfig(r=4, task_type="CAUSAL_LM"))
    layers = [layer for _, layer in model.base_model.adapted_layers()]
    shared = model.base_model.get_parameter("vera_A.default")
    assert all(layer.get_parameter("vera_A.default") is shared for layer in layers), "every layer holds one tensor"
    # Saved once, at model level, under PEFT's key; counted as PEFT counts buffers (not at all).
    keys = dpeft.get_peft_model_state_dict(model)
    assert "base_model.vera_A" in keys and not any(".vera_A" in k for k in keys if k.startswith("base_model.model."))
    reference = peft.get_peft_model(build("llama")[0], peft.VeraConfig(r=4, task_type="CAUSAL_LM"))
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()


def test_vera_unsaved_projections_are_regenerated_both_ways(tmp_path):
    """save_projection=False: no vera_A/B in the file; dpeft and PEFT both regenerate them from the key."""
    config = dict(target_modules=["lin0", "lin1"], r=4, save_projection=False, projection_prng_key=9)
    base, kw = build("mlp")
    with pytest.warns(UserWarning, match="save_projection=False"):
        model = perturbed(dpeft.get_peft_model(base, dpeft.VeraConfig(**config)))
    model.save_pretrained(tmp_path)
    assert not any("vera_A" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build("mlp")[0], tmp_path).eval()
        ours = dpeft.PeftModel.from_pretrained(build("mlp")[0], tmp_path, low_cpu_mem_usage=True)
    assert_close(out(theirs, kw), out(model, kw))
    assert_close(out(ours, kw), out(model, kw), atol=0)


def test_vera_unsaved_projections_merge_with_the_merge_tool(tmp_path):
    from models import tiny_llama
    from test_merge import logits, run_merge, save_base

    config = dpeft.VeraConfig(
        target_modules=["q_proj", "down_proj"], r=4, init_weights=False, save_projection=False, task_type="CAUSAL_LM"
    )
    config.base_model_name_or_path = "tiny-llama"
    base_dir = save_base(tiny_llama(), str(tmp_path / "tiny-llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dpeft.get_peft_model(tiny_llama(), config).eval()
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model.merge_and_unload())
    run_merge(base_dir, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    from transformers import AutoModelForCausalLM

    assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()), expected, atol=1e-5)


def test_vera_two_adapters_of_different_rank_keep_their_own_projections():
    base, kw = build("mlp")
    model = dpeft.get_peft_model(base, dpeft.VeraConfig(target_modules=["lin0"], r=2, init_weights=False))
    model.add_adapter("other", dpeft.VeraConfig(target_modules=["lin0", "lin1"], r=6, init_weights=False))
    assert model.base_model.get_parameter("vera_A.default").shape == (2, 10)
    assert model.base_model.get_parameter("vera_A.other").shape == (6, 20)
    model.delete_adapter("default")
    assert not any(".default" in n for n, _ in model.named_parameters(remove_duplicate=False))
    assert set(dpeft.get_peft_model_state_dict(model, adapter_name="other")) >= {"base_model.vera_A"}


def test_vera_config_rules():
    with pytest.raises(ValueError, match="positive"):
        dpeft.VeraConfig(r=0)
    with pytest.raises(ValueError, match="vera_only"):
        dpeft.VeraConfig(bias="lora_only")
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("conv2d")[0], dpeft.VeraConfig(target_modules=["conv2d"]))
    model = dpeft.get_peft_model(build("llama")[0], dpeft.VeraConfig(r=2))
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
