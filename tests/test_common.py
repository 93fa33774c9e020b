"""Common checks run for every row of the case table (tests/cases.py); a new row is picked up automatically."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASES, NOT_IN_TABLE, perturb_trainable
from conftest import (
    assert_close,
    assert_differs,
    batched,
    make_case,
    out,
    peft_config_of,
)
from models import build, output, real_positions

import dpeft
from dpeft.model import AdaptedLayer, ModulesToSaveWrapper

ALL = [pytest.param(c, id=c.id) for c in CASES]
MERGEABLE = [pytest.param(c, id=c.id) for c in CASES if c.mergeable]
NOT_MERGEABLE = [pytest.param(c, id=c.id) for c in CASES if not c.mergeable]


def _wrappers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (AdaptedLayer, ModulesToSaveWrapper))]


def _with_second_adapter(case, seed: int = 0):
    """A model with adapters "default" and "other" (different random inits), "default" active."""
    model, kw, ref = make_case(case, seed)
    torch.manual_seed(123)
    config = case.config()
    if "one-trainable" in case.tags:  # the method allows one trainable adapter (as in PEFT): add the second frozen
        config.inference_mode = True
    model.add_adapter("other", config)
    if case.perturb:  # noise on "other"'s trainable tensors (only the active adapter's are trainable)
        model.set_adapter("other")
        perturb_trainable(model, seed=2000)
        model.set_adapter("default")
    return model.eval(), kw, ref


def _alone(case, model, adapter: str):
    """A fresh model holding only `adapter`'s tensors copied from `model`."""
    fresh, _ = build(case.model)
    config = case.config()
    # A prompt encoder's saved state is its output, which only an inference-mode encoder takes as is (as in PEFT).
    config.inference_mode = "prompt-learning" in case.tags
    single = dpeft.get_peft_model(fresh, config).eval()
    dpeft.set_peft_model_state_dict(single, dpeft.get_peft_model_state_dict(model, adapter_name=adapter))
    return single


@pytest.mark.parametrize("case", ALL)
def test_forward_and_save_load(case, tmp_path):
    """Forward changes outputs; save -> from_pretrained onto a fresh base gives the same outputs."""
    model, kw, ref = make_case(case)
    expected = out(model, kw)
    assert_differs(real_positions(expected, ref), ref)
    if "prompt-learning" in case.tags:
        assert list(model.prompt_encoder) == ["default"], "no prompt encoder at PEFT's `prompt_encoder.<adapter>`"
        extra = expected.shape[1] - ref.shape[1]
        assert extra in (0, model.peft_config["default"].num_virtual_tokens), "virtual positions in the outputs"
    else:
        assert _wrappers(model), "no layer was adapted"
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = dpeft.PeftModel.from_pretrained(build(case.model)[0], tmp_path)
    assert not loaded.training, "from_pretrained without is_trainable must return an eval-mode model"
    assert type(loaded) is type(model)
    assert_close(out(loaded, kw), expected, atol=1e-6)
    assert loaded.get_nb_trainable_parameters()[0] == 0, "an inference-mode load must train nothing"
    if "inference-only-checkpoint" in case.tags:  # e.g. a projected prefix: the projection cannot be recovered
        with pytest.raises(ValueError, match="is_trainable=False"):
            dpeft.PeftModel.from_pretrained(build(case.model)[0], tmp_path, is_trainable=True)
        return
    trainable = dpeft.PeftModel.from_pretrained(build(case.model)[0], tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_equals_unmerged(case):
    """merge_adapter (plain and safe), unmerge, disable while merged, and merge_and_unload all agree."""
    model, kw, ref = make_case(case)
    expected = out(model, kw)
    model.merge_adapter()
    assert_close(out(model, kw), expected, msg="merge_adapter:")
    with model.disable_adapter():
        assert_close(out(model, kw), ref, msg="disabled while merged:")
    model.unmerge_adapter()
    assert_close(out(model, kw), expected, msg="after unmerge_adapter:")
    model.merge_adapter(safe_merge=True)
    assert_close(out(model, kw), expected, msg="merge_adapter(safe_merge=True):")
    model.unmerge_adapter()
    merged = model.merge_and_unload(safe_merge=True)
    assert not _wrappers(merged), "merge_and_unload must leave no adapter wrappers"
    assert not any(".base_layer." in n for n, _ in merged.named_parameters())
    assert_close(out(merged, kw), expected, msg="merge_and_unload:")


@pytest.mark.parametrize("case", NOT_MERGEABLE)
def test_merge_is_refused_and_changes_nothing(case):
    """Where PEFT has no merged form (prompts, per-row task routing), every merge is a clear error, all or nothing."""
    model, kw, _ = make_case(case)
    expected = out(model, kw)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            merge()
    assert_close(out(model, kw), expected, atol=0, msg="after a refused merge:")


@pytest.mark.parametrize("case", ALL)
def test_unload_and_disable_give_base(case):
    model, kw, ref = make_case(case)
    expected = out(model, kw)
    with model.disable_adapter():
        assert_close(out(model, kw), ref, atol=0, msg="disable_adapter:")
    assert_close(out(model, kw), expected, atol=0, msg="after disable_adapter:")
    unloaded = _base_with_saved_copies(case, model, kw, ref)
    plain = model.unload()
    assert not _wrappers(plain)
    assert [type(m) for m in plain.modules()] == [type(m) for m in build(case.model)[0].modules()]
    assert_close(out(plain, kw), unloaded, atol=0, msg="unload:")


def _base_with_saved_copies(case, model, kw, ref) -> torch.Tensor:
    """What `unload` must output: the base's outputs, with the active adapter's `modules_to_save` copies left in
    place of their modules (they hold trained weights; HF PEFT's unload keeps them too). Only a perturbed row's
    copies differ from the base modules."""
    base = build(case.model)[0]
    copies = {
        name: wrapper.modules_to_save[model.active_adapter]
        for name, wrapper in model.get_base_model().named_modules()
        if isinstance(wrapper, ModulesToSaveWrapper) and model.active_adapter in wrapper.modules_to_save
    }
    if not copies:
        return ref
    for name, module in copies.items():  # replaced, not loaded into: a tied head must not write the embedding
        base.set_submodule(name, copy.deepcopy(module))
    return out(base, kw)


@pytest.mark.parametrize("case", ALL)
def test_two_adapters(case):
    """add_adapter + set_adapter switch; each equals that adapter alone; mixed batches route per row; delete."""
    model, kw, ref = _with_second_adapter(case)
    out_default = out(model, kw)
    assert model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapter == "other"
    out_other = out(model, kw)
    assert_differs(out_other, out_default, msg="the two adapters")
    assert_close(out_default, out(_alone(case, model, "default"), kw), atol=1e-6, msg="default vs alone:")
    assert_close(out_other, out(_alone(case, model, "other"), kw), atol=1e-6, msg="other vs alone:")
    # Only the active adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable or "one-trainable" in case.tags
    assert not any(".default." in n or n.endswith(".default") for n in trainable)
    model.set_adapter("default")
    assert_close(out(model, kw), out_default, atol=0, msg="switching back:")
    if case.mixed_batch:
        _check_mixed_batch(model, kw)
    n_before = len(list(model.parameters()))
    model.set_adapter("other")
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapters == ["other"]
    assert model.store.adapters == ["other"]
    assert not any(".default." in n for n, _ in model.named_parameters())
    assert len(list(model.parameters())) < n_before
    assert_close(out(model, kw), out_other, atol=0, msg="after deleting the other adapter:")
    model.delete_adapter("other")
    assert not _wrappers(model.get_base_model()), "a layer without adapters gets its base layer back"
    assert_close(out(model, kw), ref, atol=0, msg="all adapters deleted:")


def _check_mixed_batch(model, kw) -> None:
    """`model(**inputs, adapter_names=[...])` equals each adapter's (or the base's) own output, row by row."""
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    kw = batched(kw, len(names))
    per_adapter = {}
    for name in ("other", "default"):
        model.set_adapter(name)
        per_adapter[name] = out(model, kw)
    with model.disable_adapter():
        per_adapter["__base__"] = out(model, kw)
    mixed = out(model, kw, adapter_names=names)
    for row, name in enumerate(names):
        assert_close(mixed[row], per_adapter[name][row], msg=f"mixed batch row {row} ({name}):")
    # The routing is per call: the next plain call uses the active adapter again.
    assert_close(out(model, kw), per_adapter["default"], atol=0)


@pytest.mark.parametrize("case", ALL)
def test_trainable_parameters_and_backward(case):
    """Trainable counts and names equal HF PEFT's for the same config; a backward reaches exactly those."""
    model, kw, _ = make_case(case)
    if case.peft_interop:
        import peft

        with torch.no_grad():
            reference = peft.get_peft_model(build(case.model)[0], peft_config_of(case.config()))
        assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
        ours = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        theirs = sorted(n for n, p in reference.named_parameters() if p.requires_grad)
        assert ours == theirs, "trainable parameter names differ from HF PEFT's"
    model.train()
    output(model, kw).float().pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trainable, f"no gradient for {sorted(trainable - grads)[:5]}"
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in grads)


def test_every_registered_method_has_a_row():
    """A new method arrives with case-table rows (or a stated reason in `NOT_IN_TABLE`)."""
    covered = {case.config().peft_type for case in CASES}
    missing = sorted(set(dpeft.registered_methods()) - covered - set(NOT_IN_TABLE))
    assert not missing, f"registered methods without a row in tests/cases.py: {missing}"
    assert not covered & set(NOT_IN_TABLE), "a method with rows is also listed in NOT_IN_TABLE"


def test_delete_one_of_two_active_adapters_keeps_the_other_active():
    case = next(c for c in CASES if c.id == "lora-linear")
    model, kw, _ = _with_second_adapter(case)
    model.base_model.set_adapter(["default", "other"])
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    assert_close(out(model, kw), out(_alone(case, model, "other"), kw), atol=1e-6)


def test_set_adapter_inference_mode_freezes_it():
    case = next(c for c in CASES if c.id == "lora-linear")
    model, _, _ = _with_second_adapter(case)
    model.set_adapter("other", inference_mode=True)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.set_adapter("other")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".other." in n)


def test_add_adapter_after_deleting_all():
    case = next(c for c in CASES if c.id == "lora-linear")
    model, kw, ref = make_case(case)
    model.delete_adapter("default")
    assert model.active_adapters == [] and model.active_adapter is None
    model.add_adapter("again", case.config())
    model.set_adapter("again")
    assert model.active_adapter == "again"
    assert_differs(out(model, kw), ref)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_after_add_and_set_adapter_match_peft(bias):
    """Adding an adapter keeps the biases the active adapter trains trainable, as in HF PEFT."""
    import peft

    models = {}
    for lib in (dpeft, peft):
        model = lib.get_peft_model(build("mlp")[0], lib.LoraConfig(target_modules=["lin0"], bias=bias))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"]))
        models[lib.__name__] = [sorted(n for n, p in model.named_parameters() if p.requires_grad)]
        model.set_adapter("other")
        models[lib.__name__].append(sorted(n for n, p in model.named_parameters() if p.requires_grad))
    assert models["dpeft"] == models["peft"]
