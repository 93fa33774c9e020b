"""Checkpoints and configs move both ways between dpeft and HF PEFT (the test-only oracle) with equal outputs.

Every case-table row marked `peft_interop` runs here: LoRA on Linear, Conv1d, Conv2d, Embedding and transformers
Conv1D, DoRA, rsLoRA, each bias mode, modules_to_save, rank/alpha patterns, and tiny llama / BERT / GPT-2 models.
Adapter weights are perturbed after init so that every saved tensor (B, magnitudes, biases, heads) matters.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from cases import CASES, perturb_trainable
from conftest import assert_close, out, peft_config_of
from models import build

import dpeft

peft = pytest.importorskip("peft")

INTEROP = [pytest.param(c, id=c.id) for c in CASES if c.peft_interop]


@pytest.mark.parametrize("case", INTEROP)
def test_peft_checkpoint_loads_in_dpeft(case, tmp_path):
    base, kw = build(case.model)
    reference = peft.get_peft_model(base, peft_config_of(case.config()))
    perturb_trainable(reference, seed=1)
    reference.eval()
    expected = out(reference, kw)
    reference.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own config must load without an "unknown keys" warning
        loaded = dpeft.PeftModel.from_pretrained(build(case.model)[0], tmp_path)
    assert_close(out(loaded, kw), expected)
    # Module paths of the same checkpoint loaded the same way (an inference-mode prompt encoder has no MLP).
    theirs = set(peft.PeftModel.from_pretrained(build(case.model)[0], tmp_path).state_dict())
    ours = set(loaded.state_dict())
    assert ours == theirs, (
        f"module paths differ: only dpeft {sorted(ours - theirs)[:5]}, only PEFT {sorted(theirs - ours)[:5]}"
    )


@pytest.mark.parametrize("case", INTEROP)
def test_dpeft_checkpoint_loads_in_peft(case, tmp_path):
    base, kw = build(case.model)
    model = dpeft.get_peft_model(base, case.config())
    perturb_trainable(model, seed=2)
    model.eval()
    expected = out(model, kw)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(build(case.model)[0], tmp_path)
    assert_close(out(loaded, kw), expected)
    # Same saved keys and values as PEFT would write for this adapter.
    ours = dpeft.get_peft_model_state_dict(model)
    theirs = peft.get_peft_model_state_dict(loaded)
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.peft_interop and c.perturb])
def test_same_perturbation_same_model_as_peft(case):
    """A `perturb` row's adapter starts from the base's tensors (no random init), so dpeft and PEFT models given the
    same seeded noise hold the same trainable tensors and give the same outputs, with no checkpoint in between."""
    ours = dpeft.get_peft_model(build(case.model)[0], case.config())
    theirs = peft.get_peft_model(build(case.model)[0], peft_config_of(case.config()))
    tensors = []
    for model in (ours, theirs):
        perturb_trainable(model, seed=4)
        tensors.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert sorted(tensors[0]) == sorted(tensors[1])
    for name, value in tensors[0].items():
        assert torch.equal(value, tensors[1][name]), name
    kw = build(case.model)[1]
    assert_close(out(ours.eval(), kw), out(theirs.eval(), kw))


@pytest.mark.parametrize("case", INTEROP)
def test_config_json_both_ways(case, tmp_path):
    config = case.config()
    model = dpeft.get_peft_model(build(case.model)[0], config)
    model.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    for key, value in written.items():
        if hasattr(theirs, key):
            got = getattr(theirs, key)
            got = sorted(got) if isinstance(got, set) else got
            got = getattr(got, "value", got)
            assert _canon(key, got) == _canon(key, value), f"{key}: PEFT read {got!r} from dpeft's {value!r}"
    # PEFT's own JSON (with every field PEFT has) loads in dpeft and saves back unchanged.
    reference = peft.get_peft_model(build(case.model)[0], peft_config_of(config))
    reference.save_pretrained(tmp_path / "theirs")
    peft_json = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    common = set(written) & set(peft_json)
    assert {k: _canon(k, written[k]) for k in common} == {k: _canon(k, peft_json[k]) for k in common}
    assert set(written) <= set(peft_json), f"dpeft writes keys PEFT does not: {set(written) - set(peft_json)}"
    loaded = dpeft.PeftConfig.from_pretrained(tmp_path / "theirs")
    assert type(loaded) is type(config)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again == peft_json


def _canon(key: str, value):
    """PEFT writes module-name sets in hash order; the order carries no meaning. PEFT's prompt-learning SEQ_CLS
    models list their heads twice in `modules_to_save`; the repeat carries none either."""
    sets = ("target_modules", "exclude_modules", "feedforward_modules")
    if key == "modules_to_save" and isinstance(value, list):
        return list(dict.fromkeys(value))
    return sorted(value) if key in sets and isinstance(value, list) else value


def test_unknown_config_keys_are_kept_and_warned(tmp_path):
    data = dpeft.LoraConfig(target_modules=["lin0"]).to_dict()
    data["some_future_option"] = {"x": 1}
    data["future_flag_off"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_option"):
        config = dpeft.PeftConfig.from_pretrained(tmp_path)
    assert config.extra_fields["some_future_option"] == {"x": 1}
    config.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["some_future_option"] == {"x": 1} and "future_flag_off" in saved
    assert saved == data


def test_non_default_adapters_saved_in_subfolders_load_in_peft(tmp_path):
    case = next(c for c in CASES if c.id == "lora-linear")
    base, kw = build(case.model)
    model = dpeft.get_peft_model(base, case.config())
    torch.manual_seed(5)
    model.add_adapter("other", case.config())
    model.set_adapter("other")
    model.eval()
    expected = out(model, kw)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(build(case.model)[0], tmp_path / "other")
    assert_close(out(loaded, kw), expected)
    ours = dpeft.PeftModel.from_pretrained(build(case.model)[0], tmp_path)
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    ours.set_adapter("other")
    assert_close(out(ours, kw), expected, atol=0)


def _llama_two_adapters():
    base, kw = build("llama")
    config = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    model = dpeft.get_peft_model(base, dpeft.LoraConfig(**config))
    torch.manual_seed(7)
    model.add_adapter("other", dpeft.LoraConfig(**config))
    return model.eval(), kw


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_mixed_batch_equals_per_adapter(num_beams):
    model, kw = _llama_two_adapters()
    names = ["other", "__base__", "default", "other"]
    ids = torch.cat([kw["input_ids"]] * 2)[:, :5]
    gen = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = model.generate(input_ids=ids, **gen)
    with model.disable_adapter():
        expected["__base__"] = model.generate(input_ids=ids, **gen)
    model.set_adapter("default")
    assert not torch.equal(expected["default"], expected["__base__"]), "adapters should change the generation"
    mixed = model.generate(input_ids=ids, adapter_names=names, **gen)
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], expected[name][row]), f"row {row} ({name})"


def test_older_peft_magnitude_key_loads(tmp_path):
    """Older PEFT saved DoRA's magnitude as `lora_magnitude_vector.weight`; such files still load."""
    from safetensors.torch import load_file, save_file

    case = next(c for c in CASES if c.id == "dora-linear")
    base, kw = build(case.model)
    reference = peft.get_peft_model(base, peft_config_of(case.config()))
    perturb_trainable(reference, seed=3)
    reference.eval()
    reference.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    renamed = {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in state.items()}
    assert renamed != state
    save_file(renamed, path)
    loaded = dpeft.PeftModel.from_pretrained(build(case.model)[0], tmp_path)
    assert_close(out(loaded, kw), out(reference, kw))


def test_key_mapping_renames_checkpoint_keys(tmp_path):
    case = next(c for c in CASES if c.id == "lora-linear")
    base, kw = build(case.model)
    model = dpeft.get_peft_model(base, case.config()).eval()
    model.save_pretrained(tmp_path)
    # Load onto a model whose layer is named differently, as transformers' checkpoint conversion mappings do.
    renamed, _ = build(case.model)
    renamed.first = renamed.lin0
    del renamed.lin0
    renamed.forward = lambda X: renamed.lin2(renamed.relu(renamed.lin1(renamed.relu(renamed.first(X)))))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["first", "lin1"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected keys"):
        dpeft.PeftModel.from_pretrained(renamed, tmp_path)
    loaded = dpeft.PeftModel.from_pretrained(renamed, tmp_path, key_mapping={r"^lin0\.": "first."})
    assert_close(out(loaded, kw), out(model, kw), atol=0)


def test_save_embedding_layers_flag(tmp_path):
    case = next(c for c in CASES if c.id == "lora-llama-embedding")
    model = dpeft.get_peft_model(build(case.model)[0], case.config())
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in dpeft.get_peft_model_state_dict(model)
    assert key not in dpeft.get_peft_model_state_dict(model, save_embedding_layers=False)
    other = dpeft.get_peft_model(build("llama")[0], dpeft.LoraConfig(target_modules=["q_proj"]))
    forced = dpeft.get_peft_model_state_dict(other, save_embedding_layers=True)
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(forced)
    assert "base_model.model.model.embed_tokens.weight" not in dpeft.get_peft_model_state_dict(other)


def test_mixed_batch_equals_peft_mixed_batch(tmp_path):
    model, kw = _llama_two_adapters()
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path)
    reference.load_adapter(tmp_path / "other", adapter_name="other")
    reference.eval()
    names = ["other", "__base__", "default", "other"]
    ids = torch.cat([kw["input_ids"]] * 2)
    assert_close(
        out(model, {"input_ids": ids}, adapter_names=names), out(reference, {"input_ids": ids}, adapter_names=names)
    )
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ours = model.generate(input_ids=ids[:, :5], adapter_names=names, **gen)
    theirs = reference.generate(input_ids=ids[:, :5], adapter_names=names, **gen)
    assert torch.equal(ours, theirs)
