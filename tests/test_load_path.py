"""The fast paths of injection and loading (issue 2's load target) against the generic torch calls they replace:
module walks equal `named_modules`/`parameters`, the prepared target matcher equals PEFT's rule written out by hand,
holders with lazily made hook dicts behave as modules, and a loaded model's train/eval flags are torch's."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

import dpeft
from dpeft.model.layer import AdaptedLayer
from dpeft.model.modules_to_save import ModulesToSaveWrapper
from dpeft.model.targets import find_targets, target_matcher
from dpeft.store.holders import _Holder, attach, walk_modules, walk_parameters
from tests.models import MLP, tiny_llama


def _loaded_llama(tmp_path) -> dpeft.PeftModel:
    config = dpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = dpeft.get_peft_model(tiny_llama(), config)
    model.add_adapter("other", dpeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path)
    return dpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path)


class _Shared(nn.Module):
    """A module reachable under two names (named_modules lists it once, under the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        self.b = nn.ModuleList([self.a, nn.Linear(2, 2)])
        self.empty = None


def test_walk_modules_is_named_modules_without_holders(tmp_path):
    model = _loaded_llama(tmp_path)
    for root in (model, model.base_model.model, _Shared()):
        expected = [(n, m) for n, m in root.named_modules() if not isinstance(m, _Holder)]
        got = walk_modules(root)
        assert [n for n, _ in got] == [n for n, _ in expected]
        assert all(a is b for (_, a), (_, b) in zip(got, expected))
    assert any(isinstance(m, _Holder) for _, m in model.named_modules())  # the holders were there to skip


def test_walk_modules_stops_inside_wrappers(tmp_path):
    tuner = _loaded_llama(tmp_path).base_model
    stop = (AdaptedLayer, ModulesToSaveWrapper)
    got = [n for n, _ in walk_modules(tuner.model, stop=stop)]
    wrappers = [n for n, m in tuner.model.named_modules() if isinstance(m, stop)]
    expected = [
        n
        for n, m in tuner.model.named_modules()
        if not isinstance(m, _Holder) and not any(n.startswith(w + ".") for w in wrappers)
    ]
    assert got == expected and "model.layers.0.self_attn.q_proj" in got and "lm_head" in got


def test_walk_parameters_is_parameters(tmp_path):
    model = _loaded_llama(tmp_path)
    for root in (model, _Shared()):
        assert {id(p) for p in walk_parameters(root)} == {id(p) for p in root.parameters()}
        assert len(walk_parameters(root)) == len(list(root.parameters()))


def _reference_is_target(config, key: str) -> bool:
    """PEFT's matching rule, written out directly (the definition the prepared matcher must equal)."""
    targets = config.target_modules
    exclude = config.exclude_modules

    def name_matches(spec, name):
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return name in spec or any(name.endswith(f".{t}") for t in spec)

    if exclude and name_matches(exclude, key):
        return False
    if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in config.modules_to_save or []):
        return False
    if not name_matches(targets, key):
        return False
    layers = config.layers_to_transform
    if isinstance(targets, str) or layers is None or layers == []:
        return True
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q_proj", "mlp.up_proj", "model.layers.1.self_attn.v_proj"]},
        {"target_modules": ["proj"]},  # a suffix only after a dot: matches nothing
        {"target_modules": r".*\.(k|o)_proj"},
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*layers\.1\..*"},
        {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": 0},
        {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head", "mlp"]},
    ],
)
def test_target_matcher_is_peft_rule(kwargs):
    config = dpeft.LoraConfig(r=2, **kwargs)
    model = tiny_llama()
    names = [n for n, _ in model.named_modules() if n] + ["x.q_proj", "q_proj", "xq_proj", "a.b.mlp.up_proj"]
    matches = target_matcher(config)
    expected = [n for n in names if _reference_is_target(config, n)]
    assert [n for n in names if matches(n)] == expected
    found = find_targets(model, config)
    assert [n for n, _, _ in found] == [n for n in expected if n in dict(model.named_modules())]
    for name, module, parent in found:
        assert getattr(parent, name.rpartition(".")[2]) is module


def test_holders_are_modules_with_their_own_hook_dicts():
    layer = nn.Linear(3, 3)
    attach(layer, ("lora_A", "one", "weight"), nn.Parameter(torch.ones(2, 3)))
    attach(layer, ("lora_A", "two", "weight"), nn.Parameter(torch.full((2, 3), 2.0)))
    one, two = layer.lora_A.one, layer.lora_A.two
    assert one._forward_hooks is not two._forward_hooks and one._forward_hooks is one._forward_hooks
    calls = []
    handle = one.register_state_dict_post_hook(lambda *args: calls.append(1))
    assert len(two._state_dict_hooks) == 0
    keys = list(layer.state_dict())
    assert keys == ["weight", "bias", "lora_A.one.weight", "lora_A.two.weight"] and calls == [1]
    handle.remove()
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(layer), buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert torch.equal(again.lora_A.two.weight, torch.full((2, 3), 2.0))
    again.to(torch.float64)
    assert again.lora_A.one.weight.dtype == torch.float64


def test_attach_refuses_a_name_in_use():
    layer = nn.Linear(3, 3)
    with pytest.raises(KeyError, match="already exists"):  # nn.Module's own check: `forward` is a method
        attach(layer, ("forward", "x", "weight"), nn.Parameter(torch.ones(1)))


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loaded_model_modes_and_flags_are_torchs(tmp_path, is_trainable):
    config = dpeft.LoraConfig(r=4, target_modules=["q_proj", "lin1"], init_lora_weights=False)
    for build in (tiny_llama, MLP):
        directory = tmp_path / build.__name__
        dpeft.get_peft_model(build(), config).save_pretrained(directory)
        base = build().train()
        model = dpeft.PeftModel.from_pretrained(base, directory, is_trainable=is_trainable)
        modules = list(model.modules())
        assert any(isinstance(m, _Holder) for m in modules)
        assert all(m.training == is_trainable for m in modules)
        model.train()
        assert all(m.training for m in modules)
        model.eval()
        assert not any(m.training for m in modules)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        adapter = {n for n, _ in model.named_parameters() if ".lora_" in n}
        assert trainable == (adapter if is_trainable else set())
        with pytest.raises(ValueError, match="boolean"):
            model.train("yes")
