"""Common checks run for every row of the case table (tests/cases.py); a new row is picked up automatically."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    assert_differs,
    batched,
    make_case,
    out,
    peft_config_of,
)
from models import build, output

import dpeft
from cases import CASES
from dpeft.model import AdaptedLayer, ModulesToSaveWrapper

ALL = [pytest.param(c, id=c.id) for c in CASES]
MERGEABLE = [pytest.param(c, id=c.id) for c in CASES if c.mergeable]
MIXED = [pytest.param(c, id=c.id) for c in CASES if c.mixed_batch]


def _wrappers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (AdaptedLayer, ModulesToSaveWrapper))]


def _with_second_adapter(case, seed: int = 0):
    """A model with adapters "default" and "other" (different random inits), "default" active."""
    model, kw, ref = make_case(case, seed)
    torch.manual_seed(123)
    model.add_adapter("other", case.config())
    return model.eval(), kw, ref


def _alone(case, model, adapter: str):
    """A fresh model holding only `adapter`'s tensors copied from `model`."""
    fresh, _ = build(case.model)
    single = dpeft.get_peft_model(fresh, case.config()).eval()
    dpeft.set_peft_model_state_dict(single, dpeft.get_peft_model_state_dict(model, adapter_name=adapter))
    return single


@pytest.mark.parametrize("case", ALL)
def test_forward_changes_output(case):
    model, kw, ref = make_case(case)
    assert_differs(out(model, kw), ref)
    assert _wrappers(model), "no layer was adapted"


@pytest.mark.parametrize("case", ALL)
def test_save_load_roundtrip(case, tmp_path):
    model, kw, _ = make_case(case)
    expected = out(model, kw)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    fresh, _ = build(case.model)
    loaded = dpeft.PeftModel.from_pretrained(fresh, tmp_path)
    assert not loaded.training, "from_pretrained without is_trainable must return an eval-mode model"
    assert_close(out(loaded, kw), expected, atol=1e-6)
    assert type(loaded) is type(model)
    assert loaded.get_nb_trainable_parameters()[0] == 0, "an inference-mode load must train nothing"
    trainable = dpeft.PeftModel.from_pretrained(build(case.model)[0], tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", MERGEABLE)
@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_equals_unmerged(case, safe_merge):
    model, kw, ref = make_case(case)
    expected = out(model, kw)
    model.merge_adapter(safe_merge=safe_merge)
    assert_close(out(model, kw), expected, msg="merge_adapter:")
    model.unmerge_adapter()
    assert_close(out(model, kw), expected, msg="after unmerge_adapter:")
    with model.disable_adapter():
        assert_close(out(model, kw), ref, msg="disabled after unmerge:")
    merged = model.merge_and_unload(safe_merge=safe_merge)
    assert not _wrappers(merged), "merge_and_unload must leave no adapter wrappers"
    assert not any(".base_layer." in n for n, _ in merged.named_parameters())
    assert_close(out(merged, kw), expected, msg="merge_and_unload:")


@pytest.mark.parametrize("case", MERGEABLE)
def test_disable_while_merged_gives_base(case):
    model, kw, ref = make_case(case)
    expected = out(model, kw)
    model.merge_adapter()
    with model.disable_adapter():
        assert_close(out(model, kw), ref)
    assert_close(out(model, kw), expected)


@pytest.mark.parametrize("case", ALL)
def test_unload_and_disable_give_base(case):
    model, kw, ref = make_case(case)
    expected = out(model, kw)
    with model.disable_adapter():
        assert_close(out(model, kw), ref, atol=0, msg="disable_adapter:")
    assert_close(out(model, kw), expected, atol=0, msg="after disable_adapter:")
    plain = model.unload()
    assert not _wrappers(plain)
    fresh, _ = build(case.model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in fresh.modules()]
    assert_close(out(plain, kw), ref, atol=0, msg="unload:")


@pytest.mark.parametrize("case", ALL)
def test_two_adapters_switch(case):
    model, kw, _ = _with_second_adapter(case)
    out_default = out(model, kw)
    assert model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapter == "other"
    out_other = out(model, kw)
    assert_differs(out_other, out_default, msg="the two adapters")
    assert_close(out_default, out(_alone(case, model, "default"), kw), atol=1e-6, msg="default vs alone:")
    assert_close(out_other, out(_alone(case, model, "other"), kw), atol=1e-6, msg="other vs alone:")
    model.set_adapter("default")
    assert_close(out(model, kw), out_default, atol=0, msg="switching back:")
    # Only the active adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".other." in n or n.endswith(".other") for n in trainable)


@pytest.mark.parametrize("case", MIXED)
def test_mixed_batch_equals_per_adapter(case):
    model, kw, ref = _with_second_adapter(case)
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    kw = batched(kw, len(names))
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = out(model, kw)
    with model.disable_adapter():
        per_adapter["__base__"] = out(model, kw)
    model.set_adapter("default")
    mixed = out(model, kw, adapter_names=names)
    for row, name in enumerate(names):
        assert_close(mixed[row], per_adapter[name][row], msg=f"row {row} ({name}):")
    assert_differs(per_adapter["default"], per_adapter["__base__"])
    # The routing is per call: the next plain call uses the active adapter again.
    assert_close(out(model, kw), per_adapter["default"], atol=0)


@pytest.mark.parametrize("case", ALL)
def test_delete_adapter(case):
    model, kw, ref = _with_second_adapter(case)
    out_default = out(model, kw)
    n_before = len(list(model.parameters()))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not any(".other." in n for n, _ in model.named_parameters())
    assert model.store.adapters == ["default"]
    assert len(list(model.parameters())) < n_before
    assert_close(out(model, kw), out_default, atol=0)
    model.delete_adapter("default")
    assert not _wrappers(model.get_base_model()), "a layer without adapters gets its base layer back"
    assert_close(out(model, kw), ref, atol=0)


@pytest.mark.parametrize("case", ALL)
def test_delete_active_adapter_activates_remaining(case):
    model, kw, _ = _with_second_adapter(case)
    model.set_adapter("other")
    expected = out(model, kw)
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    assert_close(out(model, kw), expected, atol=0)


@pytest.mark.parametrize("case", [c for c in ALL if c.values[0].peft_interop])
def test_trainable_parameter_counts_match_peft(case):
    import peft

    config = case.config()
    model, _, _ = make_case(case)
    base, _ = build(case.model)
    with torch.no_grad():
        reference = peft.get_peft_model(base, peft_config_of(config))
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    ours = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    theirs = sorted(n for n, p in reference.named_parameters() if p.requires_grad)
    assert ours == theirs, "trainable parameter names differ from HF PEFT's"


@pytest.mark.parametrize("case", ALL)
def test_backward_reaches_only_trainable(case):
    model, kw, _ = make_case(case)
    model.train()
    loss = output(model, kw).float().pow(2).mean()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and grads <= trainable
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in grads if "lora_B" in n)
