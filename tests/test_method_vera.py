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


def test_vera_second_adapter_may_be_deleted_first():
    base, kw = build("mlp")
    model = dpeft.get_peft_model(base, dpeft.VeraConfig(target_modules=["lin0", "lin1"], r=6, init_weights=False))
    model.add_adapter("other", dpeft.VeraConfig(target_modules=["lin0"], r=6, init_weights=False))
    assert model.base_model.get_parameter("vera_A.default").shape == (6, 20)
    assert model.base_model.get_parameter("vera_A.other").shape == (6, 10)
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


# ------------------------------------------------------------------- one set of projections per model (PEFT's rule)
SHARED_CASES = [
    pytest.param(
        dpeft.VeraConfig, dict(r=4), ("q_proj", "down_proj"), ("q_proj",), "vera_A", "vera_B", "VeRA", id="vera"
    ),
    pytest.param(
        dpeft.RandLoraConfig,
        dict(r=4, randlora_alpha=4),
        ("q_proj", "down_proj"),
        ("v_proj",),
        "randlora_A",
        "randlora_B",
        "RandLora",
        id="randlora",
    ),
]


def _two_adapters(lib, config_cls, kwargs, first, second, second_kwargs=None):
    make = getattr(lib, config_cls.__name__)
    model = lib.get_peft_model(build("llama")[0], make(target_modules=list(first), init_weights=False, **kwargs))
    model.add_adapter(
        "b", make(target_modules=list(second), init_weights=False, **{**kwargs, **(second_kwargs or {})})
    )
    return model


@pytest.mark.parametrize(("config_cls", "kwargs", "first", "second", "a_name", "b_name", "label"), SHARED_CASES)
def test_later_adapters_use_the_first_adapters_projections(config_cls, kwargs, first, second, a_name, b_name, label):
    """As in PEFT, an adapter added next to another of the same method reads the first one's projections (here it
    targets smaller layers, so its own would be smaller tensors with other random values): PEFT's outputs."""
    _, kw = build("llama")
    torch.manual_seed(0)
    ours = _two_adapters(dpeft, config_cls, kwargs, first, second)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _two_adapters(peft, config_cls, kwargs, first, second)
    # PEFT draws a second adapter's per-layer tensors in another order than dpeft: copy them (same module paths).
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "_lambda" in name or "_gamma" in name:
                mine[name].copy_(param)
    alone = dpeft.get_peft_model(
        build("llama")[0], config_cls(target_modules=list(second), init_weights=False, **kwargs)
    )
    b_own = alone.base_model.get_parameter(f"{a_name}.default")
    b_shared = ours.base_model.get_parameter(f"{a_name}.b")
    a_first = ours.base_model.get_parameter(f"{a_name}.default")
    assert b_shared.shape == b_own.shape and not torch.equal(b_shared, b_own)
    assert torch.equal(b_shared, a_first[tuple(slice(0, n) for n in b_shared.shape)])
    for name in ("default", "b"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        with torch.no_grad():
            assert_close(out(ours, kw), out(theirs, kw), atol=1e-5, msg=name)


@pytest.mark.parametrize(("config_cls", "kwargs", "first", "second", "a_name", "b_name", "label"), SHARED_CASES)
def test_one_projection_key_per_model(config_cls, kwargs, first, second, a_name, b_name, label):
    """PEFT's rules, refused before anything changes: one projection_prng_key, save_projection for all or none,
    the first adapter's rank, layers no larger than the first adapter's."""
    model = dpeft.get_peft_model(build("llama")[0], config_cls(target_modules=["q_proj"], **kwargs))
    before = {n: p.clone() for n, p in model.named_parameters()}
    bad = [
        (dict(projection_prng_key=3), "PRNG initialisation key must be the same.*set projection_prng_key=0"),
        (dict(save_projection=False), "saved for all adapters or none.*set save_projection=True"),
        (dict(r=8), "has r=8 but the first .* has r=4.*use r=4"),
        (dict(target_modules=["down_proj"]), f"{a_name}|{b_name}.*targets larger layers"),
    ]
    for extra, match in bad:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = config_cls(**{"target_modules": ["q_proj"], **kwargs, **extra})
        with pytest.raises(ValueError, match=match) as err:
            model.add_adapter("b", config)
        assert label in str(err.value) or "targets larger" in str(err.value)
        assert list(model.peft_config) == ["default"]
        after = dict(model.named_parameters())
        assert after.keys() == before.keys() and all(torch.equal(after[n], v) for n, v in before.items())
