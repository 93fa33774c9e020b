"""Quantized bases beyond the method grid: prepare_model_for_kbit_training, bad input, lazy import, saved merges."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_close
from models import MLP, tiny_llama
from test_quant import BASES, METHODS, _hf_llama, _out, adapted, float_reference
from torch import nn

import dpeft
from dpeft.quant import get_handler, quantize_linear_layers

bnb = pytest.importorskip("bitsandbytes")
LLAMA_NF4 = next(b for b in BASES if b.id == "llama-nf4")
LORA = METHODS[0]


# ---------------------------------------------------------------------------------------------------- bad input
class Linear4bit(nn.Linear):
    """A quantized layer of some other library that happens to share bnb's class name."""


class PackedInt8Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(4, 10, dtype=torch.int8))


def _mlp_with(layer: nn.Module) -> nn.Module:
    model = MLP()
    model.lin0 = layer
    return model


@pytest.mark.parametrize(
    ("layer", "named"),
    [
        pytest.param(lambda: Linear4bit(10, 20), "test_quant_prepare.Linear4bit", id="foreign-Linear4bit"),
        pytest.param(lambda: PackedInt8Linear(), "PackedInt8Linear", id="int8-weight"),
        pytest.param(
            lambda: bnb.nn.Linear8bitLt(10, 20, has_fp16_weights=False), "Linear8bitLt", id="int8-unquantized"
        ),
        pytest.param(lambda: bnb.nn.Linear4bit(10, 20, quant_type="nf4"), "Linear4bit", id="4bit-unquantized"),
    ],
)
def test_unsupported_quantized_layer_is_named(layer, named):
    model = _mlp_with(layer())
    with pytest.raises(ValueError, match="unsupported quantized layer") as err:
        dpeft.get_peft_model(model, dpeft.LoraConfig(target_modules=["lin0"]))
    assert named in str(err.value)
    assert "bitsandbytes.nn.Linear4bit" in str(err.value) and "bitsandbytes.nn.Linear8bitLt" in str(err.value)
    assert not any(type(m).__name__ == "AdaptedLayer" for m in model.modules()), "a failed injection must roll back"


def test_int8_params_with_lost_scales_is_rejected():
    layer = quantize_linear_layers(nn.Sequential(nn.Linear(10, 20)), 8)[0]
    layer.weight.SCB, layer.state.SCB = None, None
    with pytest.raises(ValueError, match="no row scales"):
        get_handler(layer)


def test_import_dpeft_does_not_import_bitsandbytes():
    code = "import sys, dpeft; assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_merge_policy():
    peft_model = adapted(LORA, BASES[0])
    with pytest.raises(ValueError, match="requantize"):
        peft_model.merge_and_unload(quantized_merge="round")


# ---------------------------------------------------------------------------------------------------- quantizing
def test_quantize_linear_layers_equals_transformers_loading():
    """dpeft's in-place quantization (for models built from configs) gives the bytes transformers' loading gives."""
    ours = quantize_linear_layers(tiny_llama(), 4, quant_type="nf4", compute_dtype=torch.float32)
    theirs = _hf_llama(4)
    ours_q, theirs_q = ours.model.layers[0].mlp.down_proj, theirs.model.layers[0].mlp.down_proj
    assert torch.equal(ours_q.weight.data, theirs_q.weight.data)
    assert isinstance(ours.lm_head, nn.Linear) and type(ours.lm_head) is type(theirs.lm_head)
    kw = LLAMA_NF4.inputs()
    with torch.no_grad():
        assert_close(_out(ours.train(), kw), _out(theirs.train(), kw), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- prepare
def _half_kbit_llama() -> nn.Module:
    model = tiny_llama().to(torch.bfloat16)
    return quantize_linear_layers(model, 4, compute_dtype=torch.bfloat16)


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_prepare_matches_hf_peft():
    import peft

    ours, theirs = _half_kbit_llama(), _half_kbit_llama()
    theirs.is_loaded_in_4bit = True  # PEFT 0.21 detects k-bit models only by this transformers-4 flag
    dpeft.prepare_model_for_kbit_training(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.prepare_model_for_kbit_training(theirs)
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert ours_params.keys() == theirs_params.keys()
    for name, p in ours_params.items():
        assert not p.requires_grad and p.dtype == theirs_params[name].dtype, name
    assert ours.model.norm.weight.dtype == torch.float32, "norms are upcast"
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8, "4-bit weights stay packed"
    assert _checkpointing(ours) and _checkpointing(theirs)
    emb = ours.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb.requires_grad, "input embeddings' output requires grad for reentrant checkpointing"


def test_prepare_without_checkpointing_and_non_reentrant():
    model = dpeft.prepare_model_for_kbit_training(_half_kbit_llama(), use_gradient_checkpointing=False)
    assert not _checkpointing(model)
    assert not model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad
    model = dpeft.prepare_model_for_kbit_training(
        _half_kbit_llama(), gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert _checkpointing(model)


def test_prepared_qlora_gradients_equal_without_checkpointing():
    """Checkpointing recomputes the forward: adapter gradients must equal those of a plain run."""
    grads = []
    for checkpointing in (True, False):
        model = quantize_linear_layers(tiny_llama(), 4, compute_dtype=torch.float32)
        model = dpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        peft_model = dpeft.get_peft_model(model, LORA.config(["q_proj", "v_proj"], "CAUSAL_LM")).train()
        kw = LLAMA_NF4.inputs()
        peft_model(**kw, labels=kw["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------- saved merges
@pytest.mark.parametrize("policy", ["requantize", "dequantize"])
def test_merged_model_saves_its_policy(policy, tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = adapted(LORA, LLAMA_NF4)
    kw = LLAMA_NF4.inputs()
    merged = peft_model.merge_and_unload(quantized_merge=policy).train()
    with torch.no_grad():
        expected = _out(merged, kw)
    merged.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    record = saved["dpeft_quantized_merge"]
    assert record["policy"] == policy
    assert record["base_quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert ("quantization_config" in saved) == (policy == "requantize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").train()
    layer = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) == (policy == "requantize")
    with torch.no_grad():
        assert_close(_out(reloaded, kw), expected, atol=1e-5, msg=f"reloaded {policy} merge")


def test_dequantize_merge_equals_float_merge():
    """Merging onto the quantized base with the dequantize policy equals merging onto the float reference."""
    base = BASES[0]
    model = base.build()
    reference = dpeft.get_peft_model(float_reference(model), LORA.config(base.targets, None))
    peft_model = adapted(LORA, base, model)
    dpeft.set_peft_model_state_dict(reference, dpeft.get_peft_model_state_dict(peft_model))
    ours = copy.deepcopy(peft_model).merge_and_unload(quantized_merge="dequantize")
    theirs = reference.merge_and_unload()
    for name, p in theirs.state_dict().items():
        assert_close(ours.state_dict()[name], p, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", METHODS[:2], ids=lambda m: m.id)
def test_merge_unmerge_in_place_then_forward_matches_new_float_reference(method):
    """After merge_adapter/unmerge_adapter re-quantize the base twice, the adapter runs on the new base weights.

    For DoRA this checks that the cached row norms of the base weight were invalidated by the re-quantization.
    """
    base = BASES[0]
    peft_model = adapted(method, base)
    kw = base.inputs()
    layer = peft_model.base_model.model.lin0.base_layer
    before = layer.weight.data.clone()
    with torch.no_grad():
        _out(peft_model, kw)  # fills any cache from the original weights
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    assert not torch.equal(layer.weight.data, before), "re-quantizing twice moves some values to other grid points"
    current_base = copy.deepcopy(peft_model).unload()
    reference = dpeft.get_peft_model(float_reference(current_base), method.config(base.targets, None)).train()
    dpeft.set_peft_model_state_dict(reference, dpeft.get_peft_model_state_dict(peft_model))
    with torch.no_grad():
        assert_close(_out(peft_model, kw), _out(reference, kw), atol=1e-5, msg="after merge + unmerge")


def test_4bit_weight_is_read_after_cpu_inference_packing():
    """On AVX512-BF16 CPUs bnb repacks 4-bit weights for eval forwards (absmax in bf16); `weight()` undoes that."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer = quantize_linear_layers(nn.Sequential(nn.Linear(64, 32)), 4)[0]
    handler = get_handler(layer)
    before = handler.weight().clone()
    layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert_close(handler.weight(), before, atol=1e-3, msg="dequantized after packing (bf16 absmax)")
    assert layer.weight.quant_state.packing_format_for_cpu, "reading the weight must leave the layer as it was"
    assert_close(handler.weight(), before, atol=1e-3, msg="read twice")
    handler.set_weight(before)  # re-quantizing writes bnb's standard layout again
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    # Not exact: the re-quantized block scales go through double quantization again.
    assert_close(handler.weight(), before, atol=1e-4, msg="re-quantized from grid values")


def test_float_base_merge_records_nothing():
    model = dpeft.get_peft_model(MLP(), dpeft.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    merged = model.merge_and_unload(quantized_merge="dequantize")
    assert not hasattr(merged, "dpeft_quantized_merge")
    assert type(merged.lin0) is nn.Linear
