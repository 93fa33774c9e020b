"""Poly (Polytropon / Multi-Head Routing): its math against a hand-written reference, the ``task_ids`` plumbing
(forward, generate, the tuner's forward, mixed batches), PEFT's config rules and errors, training step by step against
HF PEFT, and the sharded backend against the local one.

Checkpoint interop both ways and the common checks run from the rows of tests/cases.py; same-seed init and the
identity at default init from tests/test_methods_interop.py.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import assert_close, peft_config_of
from models import build
from torch import nn

import dpeft
from dpeft.methods.poly.layer import mixing_weights

peft = pytest.importorskip("peft")


class OneLinear(nn.Module):
    def __init__(self, inp: int = 6, out: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(inp, out)

    def forward(self, x, **kwargs):
        return self.lin(x)


def _reference(layer: nn.Linear, tensors: dict, x: torch.Tensor, task_ids: torch.Tensor, r: int) -> torch.Tensor:
    """Eval-mode Poly written out with loops: per row, normalised sigmoid weights per split, mixed A and B."""
    a, b, logits = tensors["poly_lora_A"], tensors["poly_lora_B"], tensors["poly_router.module_logits"]
    n_splits, n_skills = a.shape[0], a.shape[1]
    out = layer(x).clone()
    for row in range(x.shape[0]):
        w = torch.sigmoid(logits[task_ids[row]]).view(n_splits, n_skills)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-12)
        a_row = torch.cat([sum(w[q, s] * a[q, s] for s in range(n_skills)) for q in range(n_splits)], dim=0)
        b_row = torch.cat([sum(w[q, s] * b[q, s] for s in range(n_skills)) for q in range(n_splits)], dim=1)
        out[row] += x[row] @ a_row @ b_row / r
    return out


@pytest.mark.parametrize(("n_splits", "n_skills"), [(1, 3), (2, 2)])
def test_math_matches_hand_written_reference(n_splits, n_skills):
    torch.manual_seed(0)
    base = OneLinear()
    twin = copy.deepcopy(base.lin)
    config = dpeft.PolyConfig(target_modules=["lin"], r=3, n_tasks=3, n_skills=n_skills, n_splits=n_splits)
    model = dpeft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for p in model.store.parameters():
            p.normal_()  # B and the router off their init, so every term matters
    x, task_ids = torch.randn(4, 5, 6), torch.tensor([0, 2, 1, 2])
    tensors = {k.split("lin.")[-1]: v for k, v in dpeft.get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        assert_close(model(x, task_ids=task_ids), _reference(twin, tensors, x, task_ids, 3))
        # the tuner's own forward takes task_ids too (PEFT's PolyModel.forward does)
        assert_close(model.base_model(x, task_ids=task_ids), _reference(twin, tensors, x, task_ids, 3))


def test_training_weights_are_relaxed_bernoulli_samples():
    """In training the router samples u ~ U(0, 1) per weight: sigmoid(logit + log u - log(1 - u)), normalised."""
    logits = torch.randn(3, 4)
    task_ids = torch.tensor([2, 0])
    torch.manual_seed(5)
    got = mixing_weights(logits, task_ids, n_splits=2, n_skills=2, training=True)
    torch.manual_seed(5)
    u = torch.rand(2, 2, 2).clamp(torch.finfo(torch.float32).eps, 1 - torch.finfo(torch.float32).eps)
    sample = torch.sigmoid(logits[task_ids].view(2, 2, 2) + u.log() - (-u).log1p())
    assert_close(got, sample / (sample.sum(-1, keepdim=True) + 1e-12), atol=1e-6)


def test_task_ids_errors_and_config_rules():
    model = dpeft.get_peft_model(OneLinear(), dpeft.PolyConfig(target_modules=["lin"], n_tasks=2)).eval()
    x = torch.randn(3, 2, 6)
    with pytest.raises(ValueError, match="task_ids"):
        model(x)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        model(x, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="3 rows"):
        model(x, task_ids=torch.tensor([0, 1]))
    with model.disable_adapter():  # no adapter, no routing: task_ids are not needed
        model(x)
    with pytest.raises(ValueError, match="poly_type"):
        dpeft.PolyConfig(poly_type="mhr")
    with pytest.raises(ValueError, match="n_skills"):
        dpeft.PolyConfig(n_skills=0)
    # 6 input features do not split in 4: refused at injection, the model left unchanged
    base = OneLinear()
    with pytest.raises(ValueError, match="n_splits=4"):
        dpeft.get_peft_model(base, dpeft.PolyConfig(target_modules=["lin"], n_splits=4))
    assert type(base.lin) is nn.Linear
    with pytest.raises(ValueError, match="Conv2d"):
        dpeft.get_peft_model(build("conv2d")[0], dpeft.PolyConfig(target_modules=["conv2d"]))


def test_merge_is_refused_and_leaves_the_model_unchanged():
    base, kw = build("llama_tasks")
    config = dpeft.PolyConfig(target_modules=["q_proj", "v_proj"], n_tasks=2, init_weights=False)
    model = dpeft.get_peft_model(base, config).eval()
    with torch.no_grad():
        expected = model(**kw).logits
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with torch.no_grad():
        assert_close(model(**kw).logits, expected, atol=0)
    assert not any(layer.merged for _, layer in model.base_model.adapted_layers())


def test_generate_with_task_ids_matches_peft():
    config = dpeft.PolyConfig(n_tasks=2, n_skills=2, init_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    ours = dpeft.get_peft_model(build("llama")[0], config).eval()
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama")[0], peft_config_of(config)).eval()
    for model in (ours, theirs):  # the same strong router in both, so that the two tasks differ clearly
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=g) * 2.0)
    ids, task_ids = torch.tensor([[1, 5, 9], [3, 8, 21]]), torch.tensor([1, 0])
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    a = ours.generate(input_ids=ids, task_ids=task_ids, **gen)
    assert torch.equal(a, theirs.generate(input_ids=ids, task_ids=task_ids, **gen))
    assert torch.equal(a, ours.base_model.generate(input_ids=ids, task_ids=task_ids, **gen))  # PolyModel.generate
    with torch.no_grad():  # routing matters: the other task gives other logits
        diff = ours(input_ids=ids, task_ids=task_ids).logits - ours(input_ids=ids, task_ids=task_ids.flip(0)).logits
    assert diff.abs().max() > 1e-3


def test_mixed_batch_cuts_task_ids_to_each_adapters_rows():
    base, _ = build("llama")
    config = dpeft.PolyConfig(target_modules=["q_proj"], n_tasks=3, init_weights=False, task_type="CAUSAL_LM")
    model = dpeft.get_peft_model(base, config)
    model.add_adapter("other", dpeft.LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    model.eval()
    ids, task_ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1)), torch.tensor([2, 0, 1])
    names = ["default", "other", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=task_ids, adapter_names=names).logits
        alone = model(input_ids=ids[[0, 2]], task_ids=task_ids[[0, 2]]).logits
        model.set_adapter("other")
        other = model(input_ids=ids[[1]], task_ids=task_ids[[1]]).logits
    assert_close(mixed[[0, 2]], alone)
    assert_close(mixed[[1]], other)


def _train(model, ids: torch.Tensor, task_ids: torch.Tensor) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    torch.manual_seed(5)  # the router's relaxed-Bernoulli draws of both libraries start from the same state
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids, task_ids=task_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("n_splits", [1, 2])
def test_training_matches_peft_step_by_step(n_splits):
    """Same seed, same init, same SGD steps with the router sampling in training: PEFT's losses, going down."""
    config = dpeft.PolyConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], n_tasks=2, n_splits=n_splits, r=4, task_type="CAUSAL_LM"
    )
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    task_ids = torch.tensor([1, 0])
    torch.manual_seed(21)
    ours = dpeft.get_peft_model(build("llama")[0], config)
    torch.manual_seed(21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama")[0], peft_config_of(config))
    ours_losses, theirs_losses = _train(ours, ids, task_ids), _train(theirs, ids, task_ids)
    assert ours_losses[-1] < ours_losses[0]
    for step, (a, b) in enumerate(zip(ours_losses, theirs_losses)):
        assert abs(a - b) < 1e-5, f"step {step}: dpeft {a:.6f} vs PEFT {b:.6f}"


# ------------------------------------------------------------------------------------------------ sharded backend
def _sharded_parity() -> dict:
    """On each rank: the sharded model on this rank's rows (and their task_ids) against the local one on all rows."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    config = lambda: dpeft.PolyConfig(  # noqa: E731
        target_modules=["q_proj", "v_proj", "down_proj"], n_tasks=3, n_splits=2, init_weights=False
    )
    base, _ = build("llama")
    twin = copy.deepcopy(base)
    torch.manual_seed(0)
    local = dpeft.get_peft_model(base, config()).eval()  # eval: deterministic routing, comparable across ranks
    torch.manual_seed(0)
    sharded = dpeft.get_peft_model(twin, config()).eval()
    sharded.store.shard()
    ids = torch.randint(0, 64, (2 * world, 8), generator=torch.Generator().manual_seed(7))
    task_ids = torch.tensor([0, 2, 1, 2])[: 2 * world]
    mine, my_tasks = ids.chunk(world)[rank], task_ids.chunk(world)[rank]
    ref = local(input_ids=ids, labels=ids, task_ids=task_ids).loss
    ref.backward()
    loss = sharded(input_ids=mine, labels=mine, task_ids=my_tasks).loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    local_grads = {local.store.param_keys()[id(p)][0]: p.grad for p in local.store.parameters()}
    grad_diff = 0.0
    for p in sharded.store.parameters():
        key, shape, is_sharded = sharded.store.param_keys()[id(p)]
        want = local_grads[key]
        if is_sharded:
            chunk = math.ceil(shape[0] / world)
            want = want[min(shape[0], rank * chunk) : min(shape[0], (rank + 1) * chunk)]
        grad_diff = max(grad_diff, (p.grad - want).abs().max().item() if p.numel() else 0.0)
    with torch.no_grad():
        logit_diff = (
            (sharded(input_ids=mine, task_ids=my_tasks).logits - local(input_ids=mine, task_ids=my_tasks).logits)
            .abs()
            .max()
            .item()
        )
    full = sharded.store.state_dict("default")
    sd_diff = max((full[k] - v).abs().max().item() for k, v in local.store.state_dict("default").items())
    return dict(
        backend=sharded.store.backend,
        loss_diff=abs(mean.item() / world - ref.item()),
        grad_diff=grad_diff,
        logit_diff=logit_diff,
        sd_diff=sd_diff,
    )


@pytest.mark.dist
@pytest.mark.slow  # ~60 s on 2 shared cores (spawning two gloo ranks dominates)
def test_sharded_backend_matches_local():
    from dist_utils import run_distributed

    for r in run_distributed(_sharded_parity, 2):
        assert r["backend"] == "sharded", r
        assert r["loss_diff"] < 1e-6 and r["logit_diff"] < 1e-5 and r["grad_diff"] < 1e-6 and r["sd_diff"] == 0, r


def test_merge_tool_refuses_poly_before_writing(tmp_path):
    from models import tiny_llama
    from test_merge import make_config, run_merge, save_adapter, save_base

    base = save_base(tiny_llama(), str(tmp_path / "base"))
    config = make_config("POLY", dict(target_modules=["q_proj"], n_tasks=2, init_weights=False))
    save_adapter(tiny_llama(), config, str(tmp_path / "adapter"), base)
    with pytest.raises(ValueError, match="POLY adapters cannot be merged"):
        run_merge(base, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
