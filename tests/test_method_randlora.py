"""RandLoRA: the math against a hand-written reference, shared bases saved as PEFT saves them (model level and once
per layer), unsaved bases regenerated, and PEFT's config rules; plus a distributed-checkpoint round trip of the
store's special tensors (RandLoRA's per-layer copies, VB-LoRA's trainable shared bank, SHiRA's integer indices)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, out, perturbed
from models import build
from safetensors.torch import load_file

import dpeft

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("layer", ["lin0", "lin2"])  # in < out (10 -> 20) and out < in (20 -> 2)
def test_randlora_math_matches_a_hand_written_reference(layer):
    """delta W = alpha/r * sum_t large[:, t] small[t, :], small[t] = lambda[k, b] A[k, 0] gamma[b] with
    (k, b) = divmod(t, n), large[:, t] = B[:, b', k'] with (b', k') = divmod(t, r); transposed when out < in."""
    r, alpha = 3, 6
    config = dpeft.RandLoraConfig(target_modules=["lin0", "lin2"], r=r, randlora_alpha=alpha, init_weights=False)
    model = perturbed(dpeft.get_peft_model(build("mlp")[0], config))
    sd = dpeft.get_peft_model_state_dict(model)
    a, b = sd["base_model.randlora_A"], sd["base_model.randlora_B"]
    lam, gamma = (sd[f"base_model.model.{layer}.randlora_{n}"] for n in ("lambda", "gamma"))
    wrapped = model.base_model.model.get_submodule(layer)
    out_f, in_f = wrapped.base_layer.weight.shape
    small_dim, large_dim = min(in_f, out_f), max(in_f, out_f)
    n = -(-small_dim // r)
    delta = torch.zeros(large_dim, small_dim)
    for t in range(r * n):
        k, bi = divmod(t, n)
        b2, k2 = divmod(t, r)
        small_row = lam[k, bi] * a[k, 0, :small_dim] * gamma[bi]
        delta += torch.outer(b[:large_dim, b2, k2], small_row)
    delta = delta * alpha / r
    if out_f < in_f:
        delta = delta.T
    x = torch.randn(4, in_f)
    with torch.no_grad():
        assert_close(wrapped.get_delta_weight("default"), delta, atol=1e-5)
        assert_close(wrapped(x), wrapped.base_layer(x) + x @ delta.T, atol=1e-5)


def test_randlora_bases_are_saved_at_model_level_and_per_layer(tmp_path):
    model = perturbed(dpeft.get_peft_model(build("mlp")[0], dpeft.RandLoraConfig(target_modules=["lin0"], r=4)))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.randlora_A"], saved["base_model.model.lin0.randlora_A"])
    assert model.base_model.model.lin0.get_parameter("randlora_B.default") is model.base_model.get_parameter(
        "randlora_B.default"
    ), "one tensor, however many keys it is saved under"


def test_randlora_unsaved_bases_are_regenerated_both_ways(tmp_path):
    config = dict(target_modules=["lin0", "lin1"], r=4, randlora_alpha=4, save_projection=False, sparse=True)
    base, kw = build("mlp")
    with pytest.warns(UserWarning, match="save_projection=False"):
        model = perturbed(dpeft.get_peft_model(base, dpeft.RandLoraConfig(**config)))
    model.save_pretrained(tmp_path)
    assert not any("randlora_A" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build("mlp")[0], tmp_path).eval()
        ours = dpeft.PeftModel.from_pretrained(build("mlp")[0], tmp_path, low_cpu_mem_usage=True)
    assert_close(out(theirs, kw), out(model, kw))
    assert_close(out(ours, kw), out(model, kw), atol=0)


def test_randlora_config_rules():
    with pytest.raises(ValueError, match="positive"):
        dpeft.RandLoraConfig(r=0)
    with pytest.raises(ValueError, match="randlora_only"):
        dpeft.RandLoraConfig(bias="lora_only")
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("conv2d")[0], dpeft.RandLoraConfig(target_modules=["conv2d"]))


@pytest.mark.parametrize(
    "factory",
    [
        # Shared bases saved at model level and once per layer (`layer_copies`), a trainable shared bank, and an
        # integer tensor registered under no module (`attach=False`): the distributed checkpoint takes all three.
        pytest.param(lambda: dpeft.RandLoraConfig(target_modules=["q_proj", "v_proj"], r=8), id="randlora"),
        pytest.param(
            lambda: dpeft.VBLoRAConfig(target_modules=["q_proj", "v_proj"], vector_length=8, num_vectors=8),
            id="vblora",
        ),
        pytest.param(lambda: dpeft.ShiraConfig(target_modules=["q_proj", "v_proj"], r=2), id="shira"),
    ],
)
def test_distributed_checkpoint_round_trip(factory, tmp_path):
    from test_dcp import _assert_same_state, _setup, _snapshot, _steps

    from dpeft.checkpoint.dcp import load_checkpoint, save_checkpoint

    config = factory()
    config.task_type = "CAUSAL_LM"
    model, opt = _setup(config)
    _steps(model, opt, 0, 2)
    path = save_checkpoint(str(tmp_path), 2, model, opt, {"step": 2})
    fresh, fresh_opt = _setup(config)
    assert load_checkpoint(path, fresh, fresh_opt) == {"step": 2}
    want, got = _snapshot(model, opt), _snapshot(fresh, fresh_opt)
    _assert_same_state(got["adapter"], want["adapter"], 0.0)
    assert _steps(fresh, fresh_opt, 2, 1) == _steps(model, opt, 2, 1)
