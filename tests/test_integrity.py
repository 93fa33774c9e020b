"""Integrity on every save (one process; the fsdp2 cases run in tests/test_fsdp2.py): a mis-shaped, non-finite or
lost (all-zero) adapter tensor stops `save_pretrained`, `save_checkpoint` and `dpeft export` before anything is
published, with an error naming the tensor; healthy saves record and re-check each tensor's sum of squares."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import build

import dpeft
from dpeft.checkpoint.dcp import load_checkpoint, save_checkpoint
from dpeft.checkpoint.export import export_checkpoint
from dpeft.store import store as store_module
from dpeft.store.integrity import AdapterIntegrityError, verify_full_state

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _model():
    base, _ = build("llama")
    torch.manual_seed(0)
    config = dpeft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    return dpeft.get_peft_model(base, config)


def test_verify_full_state_names_each_problem():
    live = {"a": ((2, 3), torch.ones(2, 3)), "b": ((4,), torch.ones(4)), "c": ((2,), torch.ones(2))}
    verify_full_state("x", {"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(2)}, live)  # healthy
    bad = {"a": torch.zeros(2, 3), "b": torch.tensor([1.0, float("inf"), 1.0, 1.0]), "c": torch.zeros(0)}
    with pytest.raises(AdapterIntegrityError) as err:
        verify_full_state("x", bad, live)
    message = str(err.value)
    assert "a: all zeros, but the model holds nonzero values (sum of squares 6)" in message
    assert "b: 1 non-finite value(s)" in message
    assert "c: shape (0,), but its adapter config implies (2,)" in message
    # a tensor whose values differ (e.g. rows from the wrong rank) is caught too; zeros the model holds are fine
    live_zero = {"a": ((2,), torch.zeros(2)), "b": ((2,), torch.tensor([3.0, 4.0]))}
    with pytest.raises(AdapterIntegrityError, match=r"b: sum of squares 9 differs from 25"):
        verify_full_state("x", {"a": torch.zeros(2), "b": torch.tensor([3.0, 0.0])}, live_zero)


def test_save_pretrained_refuses_a_lost_gather(tmp_path, monkeypatch):
    model = _model()
    real = store_module.full_value
    monkeypatch.setattr(store_module, "full_value", lambda t: torch.zeros_like(real(t)))
    with pytest.raises(AdapterIntegrityError, match=KEY.replace(".", r"\.") + ": all zeros"):
        model.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(store_module, "full_value", real)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(AdapterIntegrityError, match=KEY.replace(".", r"\.") + ": 1 non-finite"):
        model.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoints_are_checked_on_save_load_and_export(tmp_path, monkeypatch):
    model = _model()
    root = str(tmp_path / "ckpt")
    path = save_checkpoint(root, 1, model, None, {"step": 1})
    manifest = json.load(open(os.path.join(path, "dpeft.json")))
    sq = manifest["tensors"][f"adapter/default/{KEY}"]["sq_norm"]
    assert sq == pytest.approx(float(model.store.state_dict("default")[KEY].double().pow(2).sum()), rel=1e-9)

    # a non-finite tensor: no step directory (nor temporary one) appears
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[1, 1] = float("inf")
    with pytest.raises(AdapterIntegrityError, match=KEY.replace(".", r"\.") + ": 1 non-finite"):
        save_checkpoint(root, 2, model, None, {"step": 2})
    assert sorted(os.listdir(root)) == ["step-00000001"]

    # a read that comes back zeroed: export writes nothing, load changes nothing
    import torch.distributed.checkpoint as dcp

    real_load = dcp.load

    def zeroing_load(state, **kwargs):
        real_load(state, **kwargs)
        state[f"adapter/default/{KEY}"].zero_()

    monkeypatch.setattr(dcp, "load", zeroing_load)
    with pytest.raises(AdapterIntegrityError, match="refusing to use checkpoint .*: all zeros"):
        export_checkpoint(path, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()
    fresh = _model()
    before = {k: v.clone() for k, v in fresh.store.state_dict("default").items()}
    with torch.no_grad():
        for p in fresh.store.parameters():
            p.add_(1.0)  # differ from the checkpoint, so a partial load would show
    before = {k: v.clone() for k, v in fresh.store.state_dict("default").items()}
    with pytest.raises(AdapterIntegrityError, match="all zeros"):
        load_checkpoint(path, fresh)
    for key, value in fresh.store.state_dict("default").items():
        assert torch.equal(value, before[key]), key
    monkeypatch.setattr(dcp, "load", real_load)
    load_checkpoint(path, fresh)
    export_checkpoint(path, str(tmp_path / "export"))
    assert os.path.isfile(tmp_path / "export" / "adapter_model.safetensors")
