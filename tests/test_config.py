"""Adapter configs: PEFT's fields and defaults, JSON round trips, validation with actionable errors."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

import dpeft
from dpeft.config import PeftConfig, TaskType, register_config_class
from dpeft.methods import register_method
from dpeft.methods.lora.config import _UNIMPLEMENTED_DEFAULTS


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def test_lora_defaults_equal_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = _defaults(dpeft.LoraConfig), _defaults(peft.LoraConfig)
    for name, value in ours.items():
        assert name in theirs, f"dpeft field {name} is not a PEFT LoraConfig field"
        assert value == getattr(theirs[name], "value", theirs[name]), f"default of {name}"
    # Every PEFT field dpeft lacks is one it knows about and refuses when turned on.
    missing = set(theirs) - set(ours) - {"peft_version", "runtime_config"}
    assert missing <= set(_UNIMPLEMENTED_DEFAULTS), sorted(missing - set(_UNIMPLEMENTED_DEFAULTS))
    for name in missing:
        assert _UNIMPLEMENTED_DEFAULTS[name] == theirs[name], f"'off' value of {name}"


def test_json_roundtrip(tmp_path):
    config = dpeft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules={"q_proj", "v_proj"},
        task_type=TaskType.CAUSAL_LM,
        rank_pattern={"q_proj": 2},
        layers_to_transform=[0, 1],
        use_dora=True,
    )
    assert config.target_modules == ["q_proj", "v_proj"], "sets become sorted lists (JSON has no sets)"
    assert config.task_type == "CAUSAL_LM" and config.peft_type == "LORA"
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM" and data["r"] == 4
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, dpeft.LoraConfig)
    assert loaded.to_dict() == config.to_dict()
    assert dpeft.LoraConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert dpeft.get_peft_config(config.to_dict()).to_dict() == config.to_dict()


def test_from_pretrained_kwargs_override(tmp_path):
    dpeft.LoraConfig(r=4, target_modules=["a"]).save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path, r=2).r == 2


def test_save_pretrained_into_a_file_fails(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        dpeft.LoraConfig().save_pretrained(target)


def test_unknown_keys_warn_once_and_survive_a_roundtrip(tmp_path):
    data = dpeft.LoraConfig(target_modules=["a"]).to_dict() | {"new_feature": [1, 2], "off_feature": False}
    with pytest.warns(UserWarning, match=r"\['new_feature'\]") as record:
        config = dpeft.get_peft_config(data)
    assert len(record) == 1 and "off_feature" not in str(record[0].message)
    assert config.to_dict() == data


def test_peft_version_key_is_metadata_not_a_warning():
    data = dpeft.LoraConfig(target_modules=["a"]).to_dict() | {"peft_version": "0.21.2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = dpeft.get_peft_config(data)
    assert config.to_dict()["peft_version"] == "0.21.2"


def test_unimplemented_feature_turned_on_is_refused():
    data = dpeft.LoraConfig(target_modules=["a"]).to_dict() | {"use_qalora": True}
    with pytest.raises(ValueError, match="use_qalora"):
        dpeft.get_peft_config(data)
    data = dpeft.LoraConfig(target_modules=["a"]).to_dict() | {"loftq_config": {"loftq_bits": 4}}
    with pytest.raises(ValueError, match="loftq_config"):
        dpeft.get_peft_config(data)


def test_unimplemented_feature_at_default_is_kept_silently():
    data = dpeft.LoraConfig(target_modules=["a"]).to_dict() | {"megatron_core": "megatron.core", "use_qalora": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = dpeft.get_peft_config(data)
    assert config.to_dict() == data


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"bias": "some"}, "bias='some' is not valid"),
        ({"init_lora_weights": "pissa"}, "not implemented in dpeft"),
        ({"task_type": "NOT_A_TASK"}, "not a known task type"),
        ({"target_modules": "x", "layers_to_transform": [0]}, "cannot be used when target_modules is a regex"),
        ({"target_modules": ["x"], "layers_pattern": "layers"}, "only works together with layers_to_transform"),
    ],
)
def test_invalid_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpeft.LoraConfig(**kwargs)


@pytest.mark.parametrize("targets", [3, ["a", 3]])
def test_target_modules_type_errors(targets):
    with pytest.raises(TypeError, match="target_modules"):
        dpeft.LoraConfig(target_modules=targets)


def test_wrong_method_class_for_file(tmp_path):
    data = dpeft.LoraConfig(target_modules=["a"]).to_dict() | {"peft_type": "IA3"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds a IA3 config, not LORA"):
        dpeft.LoraConfig.from_pretrained(tmp_path)


def test_duplicate_registrations_are_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_config_class("LORA", dpeft.LoraConfig)
    with pytest.raises(ValueError, match="already registered"):
        register_method(name="LORA", config_cls=dpeft.LoraConfig, make_layer=lambda *a: None, prefix="x_")


def test_get_peft_model_does_not_mutate_the_users_config():
    import torch

    config = dpeft.LoraConfig(target_modules="all-linear", init_lora_weights=False)
    before = config.to_dict()
    model = dpeft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), config)
    assert config.to_dict() == before
    # As in PEFT: a model without output embeddings keeps its last linear layer among the targets.
    assert model.peft_config["default"].target_modules == ["0", "1"]


def test_task_types_and_registered_methods_match_peft():
    peft = pytest.importorskip("peft")
    assert {t.value for t in dpeft.TaskType} == {t.value for t in peft.TaskType}
    assert "LORA" in dpeft.registered_methods()
    assert set(dpeft.registered_methods()) <= {t.value for t in peft.PeftType}
    assert set(dpeft.registered_methods()) <= {t.value for t in dpeft.PeftType}
