"""SHiRA: the sparse delta against a hand-written reference, PEFT's random mask, custom mask functions, the saved
indices (kept outside the module tree, as PEFT keeps them) and PEFT's config rules."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from models import build

import dpeft


def test_shira_delta_is_the_weights_scattered_at_the_mask():
    config = dpeft.ShiraConfig(target_modules=["lin0"], r=1, random_seed=3, init_weights=False)
    model = dpeft.get_peft_model(build("mlp")[0], config).eval()
    sd = dpeft.get_peft_model_state_dict(model)
    weights, indices = sd["base_model.model.lin0.shira_weight"], sd["base_model.model.lin0.shira_indices"]
    assert indices.dtype == torch.int32 and indices.shape == (2, 30)  # r * (in + out) = 1 * (10 + 20)
    # PEFT's random mask: the first 30 of a seeded permutation of the 200 positions, in row-major order.
    flat = sorted(torch.randperm(200, generator=torch.Generator().manual_seed(3))[:30].tolist())
    assert [r * 10 + c for r, c in indices.T.tolist()] == flat
    delta = torch.zeros(20, 10)
    for k, (row, col) in enumerate(indices.T.tolist()):
        delta[row, col] = weights[k]
    lin0 = model.base_model.model.lin0
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert_close(lin0(x), lin0.base_layer(x) + x @ delta.T, atol=1e-6)
    assert not any("shira_indices" in n for n in model.state_dict()), "PEFT keeps the indices outside its modules"


def test_shira_custom_mask_function(tmp_path):
    def diagonal_band(base_layer, r, **kwargs):  # r * (in + out) entries: the first rows, fully
        out_f, in_f = base_layer.weight.shape
        mask = torch.zeros(out_f, in_f)
        mask.view(-1)[: r * (in_f + out_f)] = 1
        return mask

    with pytest.warns(UserWarning, match="mask_fn"):
        config = dpeft.ShiraConfig(target_modules=["lin1"], r=1, mask_type="band", init_weights=False)
    config.mask_fn = diagonal_band
    model = dpeft.get_peft_model(build("mlp")[0], config).eval()
    indices = dpeft.get_peft_model_state_dict(model)["base_model.model.lin1.shira_indices"]
    assert indices[0].max() == 1 and indices.shape == (2, 40)
    model.save_pretrained(tmp_path)
    # Loading needs no mask function, also for training: the indices come from the checkpoint.
    x = {"X": torch.randn(2, 10)}
    trainable = dpeft.PeftModel.from_pretrained(build("mlp")[0], tmp_path, is_trainable=True)
    for loaded in (dpeft.PeftModel.from_pretrained(build("mlp")[0], tmp_path), trainable.eval()):
        with torch.no_grad():
            assert_close(loaded(**x), model(**x), atol=0)


def test_shira_config_rules():
    with pytest.raises(ValueError, match="positive"):
        dpeft.ShiraConfig(r=0)
    with pytest.raises(ValueError, match="more than the 40 weights"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.ShiraConfig(target_modules=["lin2"], r=2))
    with pytest.warns(UserWarning, match="mask_fn"):
        config = dpeft.ShiraConfig(target_modules=["lin0"], r=1, mask_type="custom")
    with pytest.raises(ValueError, match="needs a mask function"):
        dpeft.get_peft_model(build("mlp")[0], config)
    with pytest.warns(UserWarning, match="mask_fn"):
        config = dpeft.ShiraConfig(target_modules=["lin0"], r=1, mask_type="bad")
    config.mask_fn = lambda layer, r, **kw: torch.ones_like(layer.weight)
    with pytest.raises(ValueError, match="needs r \\* \\(in \\+ out\\) = 30"):
        dpeft.get_peft_model(build("mlp")[0], config)


def test_shira_set_scale_matches_peft(tmp_path):
    """PEFT's layer-level ``set_scale(adapter, scale)`` (SHiRA's scale is absolute, 1.0 at creation): outputs and
    the merged model equal PEFT's; a layer without the adapter ignores it, as in PEFT."""
    peft = pytest.importorskip("peft")
    import warnings

    from conftest import peft_config_of

    config = dpeft.ShiraConfig(target_modules=["lin0", "lin1"], r=1, init_weights=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("mlp")[0], peft_config_of(config)).eval()
    theirs.save_pretrained(tmp_path)
    ours = dpeft.PeftModel.from_pretrained(build("mlp")[0], tmp_path)
    x = torch.randn(4, 10)
    base = ours.base_model.model
    scales = {"lin0": 0.5, "lin1": -2.0}
    with torch.no_grad():
        unscaled = ours(X=x)
        for name, scale in scales.items():
            getattr(base, name).set_scale("default", scale)
            getattr(theirs.base_model.model, name).set_scale("default", scale)
            getattr(base, name).set_scale("other", 7.0)  # not on this layer: ignored
        assert (ours(X=x) - unscaled).abs().max() > 1e-3
        assert_close(ours(X=x), theirs(X=x), atol=1e-6)
        assert_close(
            ours.base_model.model.lin0.get_delta_weight("default"),
            theirs.base_model.model.lin0.get_delta_weight("default").to_dense(),
            atol=1e-7,
        )
        ours.merge_adapter()
        with pytest.raises(ValueError, match="unmerge it before set_scale"):
            base.lin0.set_scale("default", 1.0)
        assert_close(ours(X=x), theirs(X=x), atol=1e-6)
        ours.unmerge_adapter()
        base.lin0.set_scale("default", 1.0)
        base.lin1.set_scale("default", 1.0)
        assert_close(ours(X=x), unscaled, atol=1e-6)


def test_set_scale_is_refused_by_methods_without_a_scale():
    model = dpeft.get_peft_model(build("mlp")[0], dpeft.OFTConfig(target_modules=["lin0"], oft_block_size=5))
    with pytest.raises(ValueError, match="OFTLayer has no adapter scale"):
        model.base_model.model.lin0.set_scale("default", 0.5)
