"""Bad input raises a clear error naming the problem, and a failed load leaves the model exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close, out, snapshot
from models import build

import dpeft


def _lin(**kw) -> dpeft.LoraConfig:
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("target_modules", ["lin0", "lin1"])
    return dpeft.LoraConfig(**kw)


def _saved(tmp_path, config: dpeft.LoraConfig, name: str = "saved"):
    """Directory of an adapter saved from the mlp model with `config`."""
    model = dpeft.get_peft_model(build("mlp")[0], config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _full_snapshot(model: torch.nn.Module) -> dict:
    snap = snapshot(model)
    snap["grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    snap["training"] = [m.training for m in model.modules()]
    return snap


def _assert_unchanged(before: dict, model: torch.nn.Module, kw: dict, expected: torch.Tensor) -> None:
    after = _full_snapshot(model)
    assert before["types"] == after["types"], "module structure changed"
    assert sorted(before["params"]) == sorted(after["params"]), "parameter names changed"
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), f"parameter {name} changed"
    assert before["grad"] == after["grad"], "requires_grad changed"
    assert before["training"] == after["training"], "train/eval mode changed"
    assert_close(out(model, kw), expected, atol=0)


# ------------------------------------------------------------------------------------------- bad checkpoints
def _bad_checkpoints(tmp_path) -> dict[str, tuple[object, str]]:
    """name -> (directory of a broken adapter for the mlp model, regex the error must match)."""
    shapes = _saved(tmp_path, _lin(r=4), "shapes")
    # A config that says r=8 next to tensors of rank 4: every lora tensor has the wrong shape.
    cfg = json.loads((shapes / "adapter_config.json").read_text())
    cfg["r"] = 8
    (shapes / "adapter_config.json").write_text(json.dumps(cfg))

    keys = _saved(tmp_path, _lin(), "keys")
    cfg = json.loads((keys / "adapter_config.json").read_text())
    cfg["target_modules"] = ["lin0", "lin2"]  # the file holds lin1, the config asks for lin2
    (keys / "adapter_config.json").write_text(json.dumps(cfg))

    method = _saved(tmp_path, _lin(), "method")
    cfg = json.loads((method / "adapter_config.json").read_text())
    cfg["peft_type"] = "NOT_A_METHOD"
    (method / "adapter_config.json").write_text(json.dumps(cfg))

    absent = _saved(tmp_path, _lin(), "absent")
    cfg = json.loads((absent / "adapter_config.json").read_text())
    cfg["peft_type"] = "XLORA"  # a PEFT method this dpeft does not have
    (absent / "adapter_config.json").write_text(json.dumps(cfg))

    corrupt = _saved(tmp_path, _lin(), "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    garbage = _saved(tmp_path, _lin(), "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)

    nomatch = _saved(tmp_path, _lin(), "nomatch")
    cfg = json.loads((nomatch / "adapter_config.json").read_text())
    cfg["target_modules"] = ["does_not_exist"]
    (nomatch / "adapter_config.json").write_text(json.dumps(cfg))

    badjson = _saved(tmp_path, _lin(), "badjson")
    (badjson / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4')

    noweights = _saved(tmp_path, _lin(), "noweights")
    (noweights / "adapter_model.safetensors").unlink()

    return {
        "shapes": (shapes, r"lin0\.lora_A\.weight: checkpoint shape \(4, 10\) != model shape \(8, 10\)"),
        "keys": (keys, r"(missing keys: .*lin2\.lora_A)|(unexpected keys.*lin1\.lora_A)"),
        "method": (method, r"unknown peft_type 'NOT_A_METHOD'.*LORA"),
        "absent": (absent, r"'XLORA'"),
        "corrupt": (corrupt, r"cannot read .*adapter_model\.safetensors.*corrupt"),
        "garbage": (garbage, r"cannot read .*adapter_model\.safetensors"),
        "nomatch": (nomatch, r"does_not_exist.*not found"),
        "noweights": (noweights, r"no adapter_model\.safetensors"),
        "badjson": (badjson, r"adapter_config\.json is not valid JSON"),
    }


BAD = ["shapes", "keys", "method", "absent", "corrupt", "garbage", "nomatch", "noweights", "badjson"]


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    return _bad_checkpoints(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("bad", BAD)
def test_failed_from_pretrained_leaves_base_model_unchanged(bad, bad_checkpoints):
    directory, match = bad_checkpoints[bad]
    base, kw = build("mlp")
    expected = out(base, kw)
    before = _full_snapshot(base)
    with pytest.raises(ValueError, match=match):
        dpeft.PeftModel.from_pretrained(base, directory)
    _assert_unchanged(before, base, kw, expected)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("trainable", [False, True], ids=["eval", "train"])
def test_failed_load_adapter_leaves_peft_model_unchanged(bad, trainable, bad_checkpoints):
    directory, match = bad_checkpoints[bad]
    base, kw = build("mlp")
    model = dpeft.get_peft_model(base, _lin(target_modules=["lin1"], modules_to_save=["lin2"], bias="all"))
    if trainable:
        model.train()
    else:
        model.eval()
    expected = out(model, kw)
    before = _full_snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.load_adapter(directory, adapter_name="second")
    _assert_unchanged(before, model, kw, expected)
    assert list(model.peft_config) == ["default"] and model.store.adapters == ["default"]


def test_failed_from_pretrained_on_task_model_leaves_head_unchanged(tmp_path):
    config = dpeft.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS", r=4, init_lora_weights=False)
    model = dpeft.get_peft_model(build("bert")[0], config)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base, kw = build("bert")
    expected = out(base, kw)
    before = _full_snapshot(base)
    with pytest.raises(ValueError, match="checkpoint shape"):
        dpeft.PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(before, base, kw, expected)


# ------------------------------------------------------------------------------------------- bad configs
def test_target_modules_matching_nothing():
    base, kw = build("mlp")
    expected = out(base, kw)
    before = _full_snapshot(base)
    with pytest.raises(ValueError, match=r"\['nope'\] not found in the base model.*lin0"):
        dpeft.get_peft_model(base, dpeft.LoraConfig(target_modules=["nope"]))
    _assert_unchanged(before, base, kw, expected)


def test_regex_target_matching_nothing():
    with pytest.raises(ValueError, match="not found in the base model"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.LoraConfig(target_modules=r"lin[5-9]"))


def test_target_of_unsupported_layer_type_names_it():
    with pytest.raises(ValueError, match=r"relu \(ReLU\).*supported: nn\.Linear"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.LoraConfig(target_modules=["relu"]))


def test_add_adapter_matching_nothing_leaves_model_unchanged():
    base, kw = build("mlp")
    model = dpeft.get_peft_model(base, _lin()).eval()
    expected = out(model, kw)
    before = _full_snapshot(model)
    with pytest.raises(ValueError, match="not found"):
        model.add_adapter("second", dpeft.LoraConfig(target_modules=["nope"]))
    _assert_unchanged(before, model, kw, expected)
    assert list(model.peft_config) == ["default"]


def test_unknown_peft_type_in_dict():
    with pytest.raises(ValueError, match="unknown peft_type 'FOO'"):
        dpeft.get_peft_config({"peft_type": "FOO"})
    with pytest.raises(ValueError, match="no 'peft_type'"):
        dpeft.get_peft_config({"r": 4})


def test_config_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        dpeft.PeftModel.from_pretrained(build("mlp")[0], tmp_path)


# ------------------------------------------------------------------------------------------- unknown adapters
@pytest.fixture
def two_adapters():
    base, kw = build("mlp")
    model = dpeft.get_peft_model(base, _lin()).eval()
    model.add_adapter("other", _lin())
    return model, kw


def test_set_adapter_unknown(two_adapters):
    model, kw = two_adapters
    expected = out(model, kw)
    with pytest.raises(ValueError, match=r"\['missing'\] not found; loaded adapters: \['default', 'other'\]"):
        model.set_adapter("missing")
    assert model.active_adapter == "default"
    assert_close(out(model, kw), expected, atol=0)


def test_delete_adapter_unknown(two_adapters):
    model, _ = two_adapters
    with pytest.raises(ValueError, match=r"'missing' does not exist; loaded adapters: \['default', 'other'\]"):
        model.delete_adapter("missing")
    assert list(model.peft_config) == ["default", "other"]


def test_save_selected_adapter_unknown(two_adapters, tmp_path):
    model, _ = two_adapters
    with pytest.raises(ValueError, match=r"cannot save adapters \['missing'\]: not loaded"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["default", "missing"])
    assert not (tmp_path / "x").exists(), "nothing may be written when the selection is invalid"


def test_forward_adapter_names_unknown(two_adapters):
    model, kw = two_adapters
    with pytest.raises(ValueError, match=r"unknown adapters \['missing'\]"):
        out(model, kw, adapter_names=["default", "missing", "other", "__base__"])
    # The failed call leaves no routing behind.
    model.set_adapter("other")
    expected = out(model, kw)
    assert_close(out(model, kw, adapter_names=["other"] * 4), expected, atol=1e-6)


def test_forward_adapter_names_wrong_length(two_adapters):
    model, kw = two_adapters
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 4 rows"):
        out(model, kw, adapter_names=["default", "other", "__base__"])


def test_adapter_names_with_merged_adapter(two_adapters):
    model, kw = two_adapters
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        out(model, kw, adapter_names=["default"] * 4)


def test_add_or_load_existing_adapter_name(two_adapters, tmp_path):
    model, _ = two_adapters
    with pytest.raises(ValueError, match="'other' already exists"):
        model.add_adapter("other", _lin())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'other' is already loaded"):
        model.load_adapter(tmp_path, adapter_name="other")


def test_state_dict_of_unknown_adapter(two_adapters):
    model, _ = two_adapters
    with pytest.raises(ValueError, match="'missing' is not loaded"):
        dpeft.get_peft_model_state_dict(model, adapter_name="missing")


def test_set_state_dict_bad_keys_changes_nothing(two_adapters):
    model, kw = two_adapters
    expected = out(model, kw)
    state = dpeft.get_peft_model_state_dict(model)
    bad = {k: torch.zeros_like(v) for k, v in state.items()}
    bad["base_model.model.lin0.lora_A.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"lin0\.lora_A\.weight: checkpoint shape \(3, 3\)"):
        dpeft.set_peft_model_state_dict(model, bad)
    assert_close(out(model, kw), expected, atol=0)


# ------------------------------------------------------------------------------------------- unmergeable layers
class _Single(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def test_grouped_conv_trains_but_does_not_merge():
    torch.manual_seed(0)
    model = dpeft.get_peft_model(
        _Single(torch.nn.Conv2d(4, 8, 3, groups=2)), dpeft.LoraConfig(target_modules=["layer"], r=4)
    )
    x = torch.randn(2, 4, 6, 6)
    expected = model(x)
    with pytest.raises(ValueError, match="'default' on layer cannot be merged"):
        model.merge_adapter()
    assert_close(model(x), expected, atol=0)
    with pytest.raises(ValueError, match="rank 3 must be divisible by the conv's groups=2"):
        dpeft.get_peft_model(
            _Single(torch.nn.Conv2d(4, 8, 3, groups=2)), dpeft.LoraConfig(target_modules=["layer"], r=3)
        )


def test_lora_bias_without_base_bias_cannot_merge():
    model = dpeft.get_peft_model(
        _Single(torch.nn.Linear(5, 6, bias=False)), dpeft.LoraConfig(target_modules=["layer"], lora_bias=True)
    )
    weight = model.base_model.model.layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="no bias"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.layer.base_layer.weight, weight), "a failed merge must not change W"
