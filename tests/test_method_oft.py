"""OFT: the math against a hand-written reference, PEFT's config and layer rules, and the Conv2d form.

The common checks (save/load, merge, disable, two adapters, mixed batch) and checkpoint interop both ways run for
the `oft-*` rows of tests/cases.py; init, training and sharded parity in tests/test_methods_interop.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, out, peft_config_of
from models import build, output
from torch import nn

import dpeft

peft = pytest.importorskip("peft")


def _reference_rotation(vec: torch.Tensor, block: int, neumann: bool, terms: int) -> torch.Tensor:
    """The full block-diagonal rotation from OFT's saved (r, b(b-1)/2) tensor, written out with loops."""
    blocks = []
    for row in vec:
        s = torch.zeros(block, block)
        k = 0
        for i in range(block):
            for j in range(i + 1, block):
                s[i, j], s[j, i] = row[k], -row[k]
                k += 1
        eye = torch.eye(block)
        if not neumann:
            blocks.append((eye - s) @ torch.inverse(eye + s))
            continue
        # PEFT's series: I + 2S + 2S^2 + ... + 2S^(t-2) + S^(t-1) (t=2: I + 2S).
        # With t=3 that is I + 2S + 2S^2 + S^3, as PEFT always adds 2S^2 before its last power.
        coeffs = [1.0, 2.0][:terms] if terms <= 2 else [1.0] + [2.0] * max(2, terms - 2) + [1.0]
        blocks.append(sum(c * torch.linalg.matrix_power(s, n) for n, c in enumerate(coeffs)))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize(("neumann", "terms", "share"), [(True, 5, False), (True, 3, False), (False, 5, True)])
def test_linear_matches_hand_written_reference(neumann, terms, share):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 7))
    x = torch.randn(3, 12)
    config = dpeft.OFTConfig(
        target_modules=["0"],
        oft_block_size=4,
        init_weights=False,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
        block_share=share,
    )
    model = dpeft.get_peft_model(base, config).eval()
    vec = dpeft.get_peft_model_state_dict(model)["base_model.model.0.oft_R.weight"]
    assert vec.shape == ((1 if share else 3), 6)
    rot = _reference_rotation(vec.repeat(3, 1) if share else vec, 4, neumann, terms)
    layer = model.base_model.model[0].base_layer
    weight = layer.weight.detach().clone()
    expected = (x @ rot) @ layer.weight.T + layer.bias
    assert_close(model(x), expected, atol=1e-6)
    if not neumann:  # the exact Cayley transform is orthogonal
        assert_close(rot @ rot.T, torch.eye(12), atol=1e-5)
    merged = model.merge_and_unload()
    assert_close(merged[0].weight, weight @ rot.T, atol=1e-6)


def test_embedding_rotates_output_vectors():
    torch.manual_seed(0)
    base, kw = build("emb_conv1d")
    emb_weight = base.emb.weight.detach().clone()
    model = dpeft.get_peft_model(
        base, dpeft.OFTConfig(target_modules=["emb"], r=1, oft_block_size=0, init_weights=False)
    )
    vec = dpeft.get_peft_model_state_dict(model)["base_model.model.emb.oft_embedding_R.weight"]
    rot = _reference_rotation(vec, 5, True, 5)
    assert_close(model.base_model.model.emb(kw["X"]), emb_weight[kw["X"]] @ rot, atol=1e-6)


def test_conv2d_k3_uses_the_merged_form_and_starts_at_identity():
    """PEFT's unmerged k>1 Conv2d forward is not W R^T (it sums overlapping patches); its merged model is, and a
    PEFT checkpoint loaded in dpeft gives that merged model's outputs."""
    base, kw = build("conv2d")
    ref = out(base, kw)
    identity = dpeft.get_peft_model(build("conv2d")[0], dpeft.OFTConfig(target_modules=["conv2d"], oft_block_size=5))
    assert_close(out(identity, kw), ref, atol=1e-6)
    config = dpeft.OFTConfig(target_modules=["conv2d"], oft_block_size=5, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        theirs = peft.get_peft_model(build("conv2d")[0], peft_config_of(config)).eval()
    tmp = pytest.importorskip("tempfile").mkdtemp()
    theirs.save_pretrained(tmp)
    ours = dpeft.PeftModel.from_pretrained(build("conv2d")[0], tmp)
    assert_close(out(ours, kw), out(theirs.merge_and_unload(), kw))


def test_conv2d_several_active_adapters_equal_their_merge():
    """Two active OFT adapters on a convolution: the forward merges them in the active order (W R_a^T, then R_b^T),
    which is what `merge_adapter` and PEFT's merged model do; the two orders differ."""
    config = dpeft.OFTConfig(target_modules=["conv2d"], oft_block_size=5, init_weights=False)
    torch.manual_seed(0)
    model = dpeft.get_peft_model(build("conv2d")[0], config)
    model.add_adapter("b", config)
    _, kw = build("conv2d")
    outputs = []
    for order in (["default", "b"], ["b", "default"]):
        model.base_model.set_adapter(order)
        forward = out(model, kw)
        model.merge_adapter(order)
        assert_close(out(model, kw), forward, atol=1e-5, msg=str(order))
        model.unmerge_adapter()
        outputs.append(forward)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4  # rotations do not commute: the order is honoured


def test_block_size_is_adjusted_like_peft():
    """An oft_block_size that does not divide the layer becomes the nearest divisor, with PEFT's shapes."""
    config = dpeft.OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=3)
    with pytest.warns(UserWarning, match="adjusted to 2"):
        ours = dpeft.get_peft_model(build("mlp")[0], config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("mlp")[0], peft_config_of(config))
    ours_sd, theirs_sd = dpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}


def test_config_rules():
    with pytest.raises(ValueError, match="exactly one of r"):
        dpeft.OFTConfig(target_modules=["lin0"], r=2, oft_block_size=4)
    with pytest.raises(ValueError, match="exactly one of r"):
        dpeft.OFTConfig(target_modules=["lin0"], r=0, oft_block_size=0)
    with pytest.raises(ValueError, match="eps"):
        dpeft.OFTConfig(target_modules=["lin0"], coft=True, eps=-1e-3)
    with pytest.raises(ValueError, match="bias"):
        dpeft.OFTConfig(target_modules=["lin0"], bias="lora_only")
    with pytest.warns(UserWarning, match="no effect"):
        dpeft.OFTConfig(target_modules=["lin0"], module_dropout=0.1)


def test_unsupported_layers_are_refused():
    # transformers' Conv1D is not an OFT layer type in PEFT.
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("emb_conv1d")[0], dpeft.OFTConfig(target_modules=["conv1d"]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        dpeft.get_peft_model(grouped, dpeft.OFTConfig(target_modules=["0"], oft_block_size=2))
    before = [p.clone() for p in grouped.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, grouped.parameters()))
    assert not any("oft" in n for n, _ in grouped.named_modules())


def test_unmerge_restores_the_base_weight():
    base, kw = build("llama")
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = dpeft.OFTConfig(target_modules=["q_proj"], oft_block_size=8, init_weights=False, task_type="CAUSAL_LM")
    model = dpeft.get_peft_model(base, config)
    model.merge_adapter()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.base_layer.weight - weight).abs().max() > 1e-3
    model.unmerge_adapter()
    assert_close(q.base_layer.weight, weight, atol=1e-5)


QUANT_CONFIGS = [
    pytest.param(
        lambda: dpeft.OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=5, init_weights=False), id="oft"
    ),
    pytest.param(
        lambda: dpeft.BOFTConfig(
            target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False
        ),
        id="boft",
    ),
    pytest.param(lambda: dpeft.HRAConfig(target_modules=["lin0", "lin1"], r=3, init_weights=False), id="hra"),
    pytest.param(lambda: dpeft.DeloraConfig(target_modules=["lin0", "lin1"], r=3, init_weights=False), id="delora"),
]


@pytest.mark.parametrize("factory", QUANT_CONFIGS)
def test_orthogonal_family_on_a_4bit_base(factory):
    """On a bnb nf4 base (through the shared quantized handler, no per-method code) the forward equals the same
    adapter on the dequantized float weights, and a dequantizing merge equals the unmerged model."""
    from test_quant import _mlp, _mlp_inputs, float_reference

    model = _mlp(4)
    reference = dpeft.get_peft_model(float_reference(model), factory()).train()
    ours = dpeft.get_peft_model(model, factory()).train()
    dpeft.set_peft_model_state_dict(ours, dpeft.get_peft_model_state_dict(reference))
    kw = _mlp_inputs()
    with torch.no_grad():
        expected = out(reference, kw)
        assert_close(out(ours, kw), expected, atol=1e-5)
        merged = ours.merge_and_unload(quantized_merge="dequantize")
        assert_close(out(merged, kw), expected, atol=1e-5)


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(
            lambda: dpeft.OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8, init_weights=False),
            id="oft",
        ),
        pytest.param(
            lambda: dpeft.BOFTConfig(
                target_modules=["q_proj", "v_proj"], boft_block_size=8, boft_n_butterfly_factor=2, init_weights=False
            ),
            id="boft",
        ),
        pytest.param(lambda: dpeft.HRAConfig(target_modules=["q_proj", "v_proj"], r=4, init_weights=False), id="hra"),
    ],
)
def test_bfloat16_base_float32_adapter(factory):
    """On a bf16 base the adapter tensors are float32 (as for every method); outputs stay bf16, gradients reach the
    adapter, and merging / unmerging into the bf16 weights changes the outputs by bf16 rounding only."""
    base, kw = build("llama")
    model = dpeft.get_peft_model(base.to(torch.bfloat16), factory())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.train()
    output(model, kw).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        expected = out(model, kw)
        assert expected.dtype == torch.bfloat16
        model.merge_adapter()
        assert_close(out(model, kw).float(), expected.float(), atol=1e-2)
        model.unmerge_adapter()
        assert_close(out(model, kw).float(), expected.float(), atol=1e-2)


# ------------------------------------------------------------------------------------------------ constrained OFT
def _reference_projection(vec: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """COFT written out: each row's skew matrix S, if ||S||_F > eps / sqrt(rows), scaled onto that sphere."""
    radius = eps / vec.shape[0] ** 0.5
    rows = []
    for row in vec:
        s = torch.zeros(block, block, dtype=torch.float64)
        iu = torch.triu_indices(block, block, 1)
        s[iu[0], iu[1]] = row.double()
        s = s - s.T
        norm = torch.linalg.matrix_norm(s).item()
        rows.append(row if norm <= radius else (row.double() * radius / norm).float())
    return torch.stack(rows)


def _coft_linear(eps: float = 0.05):
    torch.manual_seed(0)
    config = dpeft.OFTConfig(target_modules=["0"], oft_block_size=4, init_weights=False, coft=True, eps=eps)
    return dpeft.get_peft_model(nn.Sequential(nn.Linear(12, 7)), config)


def test_coft_projects_before_use_and_keeps_the_projection():
    """As in PEFT: every forward first projects the stored rotation parameters (a row already inside the ball is
    kept bit for bit), computes with them, and leaves the projected values in the adapter."""
    model = _coft_linear(eps=0.05)
    key = "base_model.model.0.oft_R.weight"
    vec = dpeft.get_peft_model_state_dict(model)[key].clone()
    vec[1] *= 1e-3  # well inside the ball
    dpeft.set_peft_model_state_dict(model, {key: vec})
    projected = _reference_projection(vec, 4, 0.05)
    assert torch.equal(projected[1], vec[1]) and not torch.allclose(projected[0], vec[0])
    x = torch.randn(3, 12)
    layer = model.base_model.model[0].base_layer
    expected = (x @ _reference_rotation(projected, 4, True, 5)) @ layer.weight.T + layer.bias
    assert_close(model(x), expected, atol=1e-6)
    stored = dpeft.get_peft_model_state_dict(model)[key]
    assert_close(stored, projected, atol=1e-7)
    assert torch.equal(stored[1], vec[1])
    weight = layer.weight.detach().clone()
    merged = model.merge_and_unload()
    assert_close(merged[0].weight, weight @ _reference_rotation(projected, 4, True, 5).T, atol=1e-6)


def test_coft_gradient_is_taken_at_the_projected_value():
    """PEFT copies the projection into the parameter under no_grad: the gradient is the plain OFT gradient at the
    projected point (no derivative of the projection itself)."""
    model = _coft_linear(eps=0.05)
    x = torch.randn(3, 12)
    model(x).pow(2).sum().backward()
    param = model.base_model.model[0].oft_R["default"].weight
    plain = dpeft.get_peft_model(
        nn.Sequential(nn.Linear(12, 7)),
        dpeft.OFTConfig(target_modules=["0"], oft_block_size=4, init_weights=False),
    )
    plain.base_model.model[0].base_layer.load_state_dict(model.base_model.model[0].base_layer.state_dict())
    dpeft.set_peft_model_state_dict(plain, dpeft.get_peft_model_state_dict(model))  # the projected values
    plain(x).pow(2).sum().backward()
    assert_close(param.grad, plain.base_model.model[0].oft_R["default"].weight.grad, atol=1e-6)


COFT_LLAMA = dict(
    target_modules=["q_proj", "v_proj"],
    oft_block_size=8,
    init_weights=False,
    coft=True,
    eps=0.3,
    task_type="CAUSAL_LM",
)


def _adamw_losses(model, ids: torch.Tensor, steps: int = 4) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_coft_trains_like_peft_step_by_step():
    """Same init, same AdamW steps: PEFT's losses and tensors (the projection is active at every step)."""
    config = dpeft.OFTConfig(**COFT_LLAMA)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(21)
    ours = dpeft.get_peft_model(build("llama")[0], config)
    torch.manual_seed(21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama")[0], peft_config_of(config))
    ours_losses, theirs_losses = _adamw_losses(ours, ids), _adamw_losses(theirs, ids)
    assert ours_losses[-1] < ours_losses[0] - 1e-3
    for step, (a, b) in enumerate(zip(ours_losses, theirs_losses)):
        assert abs(a - b) < 1e-5, f"step {step}: dpeft {a:.6f} vs PEFT {b:.6f}"
    ours_sd, theirs_sd = dpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in ours_sd.items():
        assert_close(value, theirs_sd[key], atol=1e-5, msg=key)
    radius = COFT_LLAMA["eps"] / 2  # 4 blocks per layer: eps / sqrt(4)
    assert max(v.norm(dim=1).max().item() for v in ours_sd.values()) * 2**0.5 > radius  # the ball was left...
    with torch.no_grad():
        ours(input_ids=ids)  # ...and the next forward projects back onto it
    after = dpeft.get_peft_model_state_dict(ours)
    assert max(v.norm(dim=1).max().item() for v in after.values()) * 2**0.5 <= radius * (1 + 1e-6)


def test_coft_checkpoints_both_ways(tmp_path):
    """An unprojected PEFT checkpoint loads in dpeft with PEFT's outputs (both project on first use); dpeft's
    checkpoint loads in PEFT with the same outputs; coft and eps round-trip in adapter_config.json."""
    config = dpeft.OFTConfig(**COFT_LLAMA)
    _, kw = build("llama")
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama")[0], peft_config_of(config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = dpeft.PeftModel.from_pretrained(build("llama")[0], tmp_path / "peft")
    assert ours.peft_config["default"].coft and ours.peft_config["default"].eps == 0.3
    with torch.no_grad():
        assert_close(out(ours, kw), out(theirs, kw), atol=1e-5)
    torch.manual_seed(5)
    ours = dpeft.get_peft_model(build("llama")[0], config)
    ours.save_pretrained(tmp_path / "dpeft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path / "dpeft").eval()
    assert theirs.peft_config["default"].coft and theirs.peft_config["default"].eps == 0.3
    with torch.no_grad():
        assert_close(out(theirs, kw), out(ours.eval(), kw), atol=1e-5)


def _coft_sharded_run() -> dict:
    """Rank-local: the same COFT AdamW steps on a local model (whole batch) and a sharded one (this rank's rows)."""
    import copy

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    base, _ = build("llama")
    twin = copy.deepcopy(base)
    torch.manual_seed(0)
    local = dpeft.get_peft_model(base, dpeft.OFTConfig(**COFT_LLAMA))
    torch.manual_seed(0)
    sharded = dpeft.get_peft_model(twin, dpeft.OFTConfig(**COFT_LLAMA))
    sharded.store.shard()
    ids = torch.randint(0, 64, (2 * world, 8), generator=torch.Generator().manual_seed(7))
    local_losses = _adamw_losses(local, ids)
    mine = _adamw_losses(sharded, ids.chunk(world)[rank])
    means = []
    for loss in mine:
        t = torch.tensor(loss)
        dist.all_reduce(t)
        means.append(t.item() / world)
    full, ref = sharded.store.state_dict("default"), local.store.state_dict("default")
    return {
        "loss_diff": max(abs(a - b) for a, b in zip(means, local_losses)),
        "sd_diff": max((full[k] - v).abs().max().item() for k, v in ref.items()),
        "sharded": sharded.store.collective,
    }


@pytest.mark.dist
@pytest.mark.slow  # ~50 s on 2 shared cores (two spawned ranks import torch, transformers and build llama twice)
def test_coft_sharded_backend_matches_local():
    """The projection writes through the store: under the sharded backend each rank projects its own rows, and
    training gives the local run's losses and tensors."""
    from dist_utils import run_distributed

    for r in run_distributed(_coft_sharded_run, 2):
        assert r["sharded"] and r["loss_diff"] < 1e-5 and r["sd_diff"] < 1e-5, r
