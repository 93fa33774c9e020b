"""Every method on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, on CPU.

One table of method rows (`METHODS`) runs over one table of quantized bases (`BASES`): a method that lands adds
a row; nothing else changes. References:
- the float reference: the same adapter on a float copy of the base whose weights are bnb's dequantized ones
  (computed here with bitsandbytes directly, not through dpeft's handlers);
- HF PEFT (with its bnb layers) on the same quantized base, both ways through saved checkpoints.

Models run in train mode with no dropout: bnb's 8-bit CPU matmul dequantizes the weight in training, which makes
the float reference exact up to float rounding (tolerance FWD_ATOL). In eval mode bnb 8-bit also quantizes the
activations to int8 (LLM.int8()), a ~1e-3 relative error that is bnb's, not dpeft's.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import assert_close, assert_differs, peft_config_of
from models import MLP, tiny_llama
from torch import nn

import dpeft
from dpeft.quant import quantize_linear_layers

bnb = pytest.importorskip("bitsandbytes")

FWD_ATOL = 1e-5  # quantized base + adapter vs float reference of the dequantized weights (train mode)
REQUANT_VS_PEFT_ATOL = 1e-4  # re-quantized merge vs PEFT's: same rounding, up to float-order differences in W + dW


@dataclass(frozen=True)
class MethodRow:
    """A method under test: the config class name (same in dpeft and HF PEFT) and its arguments."""

    id: str
    config_cls: str
    kwargs: dict = field(default_factory=dict)
    peft_bits: tuple[int, ...] = (4, 8)  # bases on which HF PEFT can hold this method at all
    peft_bnb: bool = True  # HF PEFT has bnb-specific layers for this method (else it wraps bnb as nn.Linear)
    peft_merge: bool = True  # HF PEFT's merge onto bnb layers is correct (re-quantizing merge compared with it)
    feedforward: bool = False  # IA3: the last target is a feedforward module
    mergeable: bool = True

    def config(self, targets: list[str], task_type: str | None) -> dpeft.PeftConfig:
        kwargs = dict(self.kwargs)
        if self.feedforward:
            kwargs["feedforward_modules"] = [targets[-1]]
        return getattr(dpeft, self.config_cls)(target_modules=list(targets), task_type=task_type, **kwargs)


# PEFT's LoHa/LoKr/FourierFT wrap a bnb layer like a float nn.Linear: their forward is right, their merge adds
# the delta to the packed integer weight, so only the forward and checkpoints are compared with PEFT for them.
# PEFT's LoHa/LoKr also take their shapes from the packed 4-bit weight (N, 1), so PEFT has them on 8-bit only.
METHODS = [
    MethodRow("lora", "LoraConfig", {"r": 4, "lora_alpha": 8, "init_lora_weights": False}),
    MethodRow("dora", "LoraConfig", {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "use_dora": True}),
    MethodRow("ia3", "IA3Config", {}, peft_merge=False, feedforward=True),
    MethodRow(
        "loha",
        "LoHaConfig",
        {"r": 4, "alpha": 8, "init_weights": False},
        peft_bits=(8,),
        peft_bnb=False,
        peft_merge=False,
    ),
    MethodRow(
        "lokr",
        "LoKrConfig",
        {"r": 2, "alpha": 4, "init_weights": False},
        peft_bits=(8,),
        peft_bnb=False,
        peft_merge=False,
    ),
    MethodRow("fourierft", "FourierFTConfig", {"n_frequency": 16, "scaling": 10.0}, peft_bnb=False, peft_merge=False),
    MethodRow("miss", "MissConfig", {"r": 2, "init_weights": False}, peft_bnb=False),  # PEFT: a quant backend
    # PEFT's SVDLinear4bit/8bitLt have no merge: only forward and checkpoints are compared with PEFT.
    MethodRow(
        "adalora",
        "AdaLoraConfig",
        {"init_r": 4, "lora_alpha": 1, "total_step": 10, "init_lora_weights": False},
        peft_merge=False,
    ),
]


@functools.cache
def _llama_dir() -> str:
    """A tiny Llama saved once per session, so transformers can load it with a `BitsAndBytesConfig`."""
    path = tempfile.mkdtemp(prefix="dpeft-qllama-")
    tiny_llama().save_pretrained(path)
    return path


def _mlp(bits: int, quant_type: str = "nf4") -> nn.Module:
    torch.manual_seed(0)
    return quantize_linear_layers(MLP(), bits, quant_type=quant_type, compute_dtype=torch.float32)


def _hf_llama(bits: int) -> nn.Module:
    return copy.deepcopy(_loaded_llama(bits))


@functools.cache
def _loaded_llama(bits: int) -> nn.Module:
    """The tiny Llama loaded by transformers with bnb quantization, once per session (tests get copies)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(_llama_dir(), quantization_config=q, device_map="cpu")


@dataclass(frozen=True)
class Base:
    id: str
    build: Callable[[], nn.Module]
    bits: int
    targets: tuple[str, ...]
    task_type: str | None
    inputs: Callable[[], dict]


def _mlp_inputs() -> dict:
    return {"X": torch.randn(4, 10, generator=torch.Generator().manual_seed(1))}


def _llama_inputs() -> dict:
    return {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}


LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj")
BASES = [
    Base("mlp-nf4", lambda: _mlp(4, "nf4"), 4, ("lin0", "lin1"), None, _mlp_inputs),
    Base("mlp-fp4", lambda: _mlp(4, "fp4"), 4, ("lin0", "lin1"), None, _mlp_inputs),
    Base("mlp-int8", lambda: _mlp(8), 8, ("lin0", "lin1"), None, _mlp_inputs),
    Base("llama-nf4", lambda: _hf_llama(4), 4, LLAMA_TARGETS, "CAUSAL_LM", _llama_inputs),
    Base("llama-int8", lambda: _hf_llama(8), 8, LLAMA_TARGETS, "CAUSAL_LM", _llama_inputs),
]

GRID = [pytest.param(m, b, id=f"{m.id}-{b.id}") for m in METHODS for b in BASES]
INTEROP = [pytest.param(m, b, id=f"{m.id}-{b.id}") for m in METHODS for b in BASES if b.bits in m.peft_bits]
MERGE = [pytest.param(m, b, id=f"{m.id}-{b.id}") for m in METHODS if m.mergeable for b in BASES]


# ---------------------------------------------------------------------------------------------------- helpers
def _out(model: nn.Module, kw: dict) -> torch.Tensor:
    out = model(**kw)
    return out if isinstance(out, torch.Tensor) else out.logits


def _dequantized(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb)


def float_reference(model: nn.Module) -> nn.Module:
    """A copy of `model` with every bnb layer replaced by an `nn.Linear` holding bnb's dequantized weight."""
    ref = copy.deepcopy(model)
    for name, layer in list(ref.named_modules()):
        if not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(_dequantized(layer.weight, layer))
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, lin)
    return ref


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable (adapter) tensor off its init, so that each one shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def adapted(method: MethodRow, base: Base, model: nn.Module | None = None) -> dpeft.PeftModel:
    model = base.build() if model is None else model
    peft_model = dpeft.get_peft_model(model, method.config(base.targets, base.task_type))
    perturb(peft_model)
    return peft_model.train()


def _hf_peft(method: MethodRow, base: Base, model: nn.Module):
    """HF PEFT on `model` through its bnb layers (PEFT 0.21 picks them by transformers 4's loaded-in-kbit flags)."""
    import peft

    setattr(model, f"is_loaded_in_{base.bits}bit", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft, peft_config_of(method.config(base.targets, base.task_type))


def _is_bnb(module: nn.Module) -> bool:
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


# ---------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(("method", "base"), GRID)
def test_forward_matches_float_reference(method, base):
    model = base.build()
    reference_base = float_reference(model)
    kw = base.inputs()
    with torch.no_grad():
        base_out = _out(model.train(), kw)
    peft_model = adapted(method, base, model)
    assert any(_is_bnb(m.base_layer) for _, m in peft_model.base_model.adapted_layers())
    reference = dpeft.get_peft_model(reference_base, method.config(base.targets, base.task_type)).train()
    dpeft.set_peft_model_state_dict(reference, dpeft.get_peft_model_state_dict(peft_model))
    with torch.no_grad():
        actual, expected = _out(peft_model, kw), _out(reference, kw)
    assert_differs(actual, base_out, msg="the adapter must change the output")
    assert_close(actual, expected, atol=FWD_ATOL, msg="quantized base vs dequantized float reference")


@pytest.mark.parametrize(("method", "base"), GRID)
def test_gradients_reach_only_adapters(method, base):
    peft_model = adapted(method, base)
    adapter_numel = sum(t.numel() for t in dpeft.get_peft_model_state_dict(peft_model).values())
    _out(peft_model, base.inputs()).float().pow(2).mean().backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == adapter_numel
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"{name} is frozen but got a gradient"


@pytest.mark.parametrize(("method", "base"), GRID)
def test_save_load_roundtrip(method, base, tmp_path):
    peft_model = adapted(method, base)
    kw = base.inputs()
    with torch.no_grad():
        expected = _out(peft_model, kw)
    peft_model.save_pretrained(tmp_path)
    loaded = dpeft.PeftModel.from_pretrained(base.build(), tmp_path).train()
    with torch.no_grad():
        assert_close(_out(loaded, kw), expected, atol=1e-6, msg="reloaded adapter")


@pytest.mark.parametrize(("method", "base"), INTEROP)
def test_hf_peft_interop_both_ways(method, base, tmp_path):
    kw = base.inputs()
    # HF PEFT saves, dpeft loads.
    peft, peft_cfg = _hf_peft(method, base, model := base.build())
    theirs = peft.get_peft_model(model, peft_cfg)
    peft_layer = type(theirs.base_model.model.get_submodule(_first_target(theirs, base)))
    assert ("bnb" in peft_layer.__module__) == method.peft_bnb, peft_layer
    perturb(theirs)
    theirs.train().save_pretrained(tmp_path / "peft")
    ours = dpeft.PeftModel.from_pretrained(base.build(), tmp_path / "peft").train()
    with torch.no_grad():
        assert_close(_out(ours, kw), _out(theirs, kw), atol=FWD_ATOL, msg="HF PEFT -> dpeft")
    # dpeft saves, HF PEFT loads.
    ours = adapted(method, base)
    ours.save_pretrained(tmp_path / "dpeft")
    peft, _ = _hf_peft(method, base, model := base.build())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(model, tmp_path / "dpeft").train()
    with torch.no_grad():
        assert_close(_out(theirs, kw), _out(ours, kw), atol=FWD_ATOL, msg="dpeft -> HF PEFT")


def _first_target(peft_model, base: Base) -> str:
    return next(n for n, _ in peft_model.base_model.model.named_modules() if n.endswith(base.targets[0]))


@pytest.mark.parametrize(("method", "base"), MERGE)
def test_merge_policies(method, base, record_property):
    peft_model = adapted(method, base)
    kw = base.inputs()
    with torch.no_grad():
        expected = _out(peft_model, kw)
    requant = copy.deepcopy(peft_model).merge_and_unload(quantized_merge="requantize").train()
    dequant = copy.deepcopy(peft_model).merge_and_unload(quantized_merge="dequantize").train()
    targets = [m for n, m in requant.named_modules() if n.endswith(base.targets)]
    assert targets and all(_is_bnb(m) for m in targets), "requantize keeps the quantized layers"
    assert not any(_is_bnb(m) for m in dequant.modules()), "dequantize leaves no quantized layer"
    with torch.no_grad():
        requant_out, dequant_out = _out(requant, kw), _out(dequant, kw)
    assert_close(dequant_out, expected, atol=FWD_ATOL, msg="dequantize policy vs unmerged adapter")
    rel = ((requant_out - expected).norm() / expected.norm()).item()
    record_property("requantize_rel_error", rel)
    print(f"[{method.id}-{base.id}] requantize merge: relative output error {rel:.3g}")
    assert rel > 0, "re-quantizing must round the merged weight"
    if method.peft_merge:  # PEFT's merge on the same adapter is the reference for the re-quantizing policy
        with torch.no_grad():
            assert_close(
                requant_out,
                _peft_merged_out(method, base, peft_model, kw),
                atol=REQUANT_VS_PEFT_ATOL,
                msg="requantize policy vs HF PEFT's merge_and_unload",
            )
    for merged, policy in ((requant, "requantize"), (dequant, "dequantize")):
        holder = merged.config if hasattr(merged, "config") else merged
        record = holder.dpeft_quantized_merge
        assert record["policy"] == policy and record["base_quantization"]
    if hasattr(dequant, "config"):
        assert not hasattr(dequant.config, "quantization_config")
        assert requant.config.quantization_config is not None


def _peft_merged_out(method: MethodRow, base: Base, peft_model: dpeft.PeftModel, kw: dict) -> torch.Tensor:
    """HF PEFT's merge_and_unload output for `peft_model`'s adapter on a fresh copy of the same quantized base."""
    peft, peft_cfg = _hf_peft(method, base, model := base.build())
    theirs = peft.get_peft_model(model, peft_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.set_peft_model_state_dict(theirs, dpeft.get_peft_model_state_dict(peft_model))
        return _out(theirs.merge_and_unload().train(), kw)
