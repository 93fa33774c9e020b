"""Every registered method under the fsdp2 backend (`dpeft.dist.fsdp.apply_fsdp`) on 2 gloo CPU ranks.

One table, no per-method code: the rows are tests/test_methods_interop.py's PARITY rows (the configs whose training
matches HF PEFT step by step on the tiny Llama) plus rows for the methods that table leaves out. Each rank builds the
same model twice, a one-process reference that sees the whole global batch and an FSDP2-wrapped twin that sees its
1/W rows, and both take the same SGD steps in eval mode: dropout and Poly's router sampling are random draws that
one process over the whole batch and W ranks over its parts cannot share (gradients flow in eval mode all the same).

Tolerances come from float32 summation order only (the loss of the halves averaged vs the whole batch's, FSDP2's
reduce-scatter averaging): 1e-5 on each step's loss; on first-step gradients 1e-5 relative to the largest gradient
(DeLoRA's reach ~150) and on adapter values after the steps, in the store and in the file `save_pretrained` wrote,
1e-5 relative to the largest value; 1e-5 on HF PEFT's logits from the FSDP2-saved adapter.
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from dist_utils import run_distributed
from models import build

import dpeft
from dpeft.methods.registry import registered_methods

pytestmark = pytest.mark.dist

STEPS, LR = 3, 0.5
LOSS_ATOL, GRAD_RTOL, VALUE_RTOL, PEFT_ATOL = 1e-5, 1e-5, 1e-5, 1e-5


def _rows() -> dict[str, tuple[str, object]]:
    """id -> (model name of tests/models.py, config factory)."""
    from test_methods_interop import PARITY

    rows = {p.id: ("llama", p.values[0]) for p in PARITY}
    rows["lora"] = ("llama", lambda: dpeft.LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False))
    rows["dora"] = (
        "llama",
        lambda: dpeft.LoraConfig(target_modules=["q_proj", "down_proj"], r=4, use_dora=True, init_lora_weights=False),
    )
    rows["poly"] = ("llama_tasks", lambda: dpeft.PolyConfig(n_tasks=2, n_skills=3, task_type="CAUSAL_LM"))
    rows["multitask-prompt-tuning"] = (
        "llama_tasks",
        lambda: dpeft.MultitaskPromptTuningConfig(
            num_virtual_tokens=3, num_tasks=2, num_ranks=2, task_type="CAUSAL_LM"
        ),
    )
    return rows


ROWS = _rows()
# A cheap default run over one method of each kind; the slow test runs every row.
DEFAULT = ["lora", "ia3", "vera-dropout", "vblora-dropout", "oft", "prompt-tuning"]


def _inputs(model_name: str, world: int) -> dict[str, torch.Tensor]:
    """The global batch: 2 rows per rank, tests/models.py's inputs repeated with fresh tokens."""
    _, kw = build(model_name)
    g = torch.Generator().manual_seed(7)
    out = {"input_ids": torch.randint(0, 64, (2 * world, 8), generator=g)}
    if "task_ids" in kw:
        out["task_ids"] = kw["task_ids"].repeat(world)
    return out


def _loss(model, kw: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**kw, labels=kw["input_ids"]).loss


def _train(model, params: list, kw: dict, grads_of) -> tuple[list[float], dict]:
    """STEPS SGD steps on `kw`; (losses, the first step's full gradients by checkpoint key)."""
    optimizer = torch.optim.SGD(params, lr=LR)
    losses, first = [], {}
    for step in range(STEPS):
        loss = _loss(model, kw)
        loss.backward()
        if step == 0:
            first = grads_of(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, first


def _grads(model) -> dict[str, torch.Tensor]:
    keys = model.store.param_keys()
    out = {}
    for p in model.store.optimizer_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[keys[id(p)][0]] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad.detach().clone()
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest difference, largest magnitude in `b`) over the tensors of two state dicts with the same keys."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    keys = [k for k in a if a[k].numel() and a[k].is_floating_point()]
    diff = max([(a[k] - b[k]).abs().max().item() for k in keys] or [0.0])
    return diff, max([b[k].abs().max().item() for k in keys] or [0.0])


def _peft_logits(model_name: str, folder: str, kw: dict) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(model_name)[0], folder).eval()
    with torch.no_grad():
        return loaded(**kw).logits


def _method_parity(row: str) -> dict:
    """One row on this rank: losses, gradients, saved adapter and HF PEFT's logits, FSDP2 vs one process."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from dpeft.dist.fsdp import apply_fsdp

    rank, world = dist.get_rank(), dist.get_world_size()
    model_name, factory = ROWS[row]
    torch.manual_seed(21)
    local = dpeft.get_peft_model(build(model_name)[0], factory()).eval()
    torch.manual_seed(21)
    wrapped = apply_fsdp(dpeft.get_peft_model(build(model_name)[0], factory())).eval()
    kw = _inputs(model_name, world)
    mine = {k: v.chunk(world)[rank] for k, v in kw.items()}
    ref_losses, ref_grads = _train(local, [p for p in local.parameters() if p.requires_grad], kw, _grads)
    losses, grads = _train(wrapped, wrapped.store.optimizer_parameters(), mine, _grads)
    for loss in losses:
        dist.all_reduce(loss)
    loss_diff = max(abs(a.item() / world - b.item()) for a, b in zip(losses, ref_losses))
    full = wrapped.store.state_dict("default")
    out = dict(
        backend=wrapped.store.backend,
        # Every trainable tensor is sharded, model-level shared ones (VB-LoRA's bank) too.
        all_dtensor=all(isinstance(p, DTensor) for p in wrapped.store.optimizer_parameters()),
        loss_diff=loss_diff,
        loss_drop=ref_losses[0].item() - ref_losses[-1].item(),
        grad_diff=_max_diff(grads, ref_grads),
        value_diff=_max_diff(full, local.store.state_dict("default")),
    )
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as ref_dir:
        wrapped.save_pretrained(tmp, is_main_process=rank == 0)
        if rank == 0:
            local.save_pretrained(ref_dir)
            out["saved_diff"] = _max_diff(_saved(tmp), _saved(ref_dir))
            with torch.no_grad():
                ref = local(**kw).logits
            out["peft_diff"] = (_peft_logits(model_name, tmp, kw) - ref).abs().max().item()
    return out


def _saved(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{folder}/adapter_model.safetensors")


def _all(rows: list[str]) -> dict:
    # One spawn for every row: starting the ranks costs more than a row.
    return {row: _method_parity(row) for row in rows}


def _check(rows: list[str], timeout: float) -> None:
    per_rank = run_distributed(_all, 2, rows, timeout=timeout)
    for row in rows:
        for rank, r in enumerate(results[row] for results in per_rank):
            assert r["backend"] == "fsdp2" and r["all_dtensor"], (row, rank, r)
            assert r["loss_drop"] > 0, (row, rank, r)  # the steps train something
            assert r["loss_diff"] < LOSS_ATOL, (row, rank, r)
            assert r["grad_diff"][0] <= GRAD_RTOL * r["grad_diff"][1], (row, rank, r)
            assert r["value_diff"][0] <= VALUE_RTOL * r["value_diff"][1], (row, rank, r)
        saved_diff, scale = per_rank[0][row]["saved_diff"]  # the files save_pretrained wrote: same keys, values
        assert saved_diff <= VALUE_RTOL * scale and per_rank[0][row]["peft_diff"] < PEFT_ATOL, (row, per_rank[0][row])


def test_every_registered_method_has_a_row():
    covered = {factory().peft_type for _, factory in ROWS.values()}
    covered = {getattr(t, "value", t) for t in covered}
    assert set(registered_methods()) - covered == set(), "add a row to tests/test_fsdp2_methods.py ROWS"


def test_fsdp2_matches_one_process_for_a_method_of_each_kind():
    _check(DEFAULT, timeout=300)


@pytest.mark.slow
def test_fsdp2_matches_one_process_for_every_method():
    _check(list(ROWS), timeout=900)


def _plan(config: dpeft.PeftConfig, root_of):
    from dpeft.store.fsdp_view import locate_parameters, plan_ownership

    model = dpeft.get_peft_model(build("mlp")[0], config)
    entries = [e for e in model.store.entries("default")]
    blocks = [model.base_model.model.lin0, model.base_model.model.lin1]  # stand-ins for two transformer blocks
    return model, plan_ownership(entries, locate_parameters(root_of(model)), blocks)


def test_ownership_plan_puts_shared_tensors_in_the_root_group_and_refuses_what_no_group_can_own():
    """Which FSDP2 group owns each tensor (no process group needed): a tensor shared by two blocks goes to the
    root, a frozen unregistered one stays replicated, and what FSDP2 could not own is refused before wrapping."""
    vera = dpeft.VeraConfig(target_modules=["lin0", "lin1"], r=4)
    model, (root_owned, unregistered) = _plan(vera, lambda m: m)
    shared = [p for e in model.store.entries("default") if e.shared for p in e.params.values()]
    assert len(shared) == 2 and {id(p) for p in root_owned} == {id(p) for p in shared}  # vera_A, vera_B
    assert unregistered == []
    model, (root_owned, unregistered) = _plan(dpeft.ShiraConfig(target_modules=["lin0", "lin1"], r=2), lambda m: m)
    assert root_owned == set() and len(unregistered) == 2 and not any(p.requires_grad for p in unregistered)
    with pytest.raises(ValueError, match="vera_A is shared by transformer blocks .0, 1. but registered nowhere"):
        _plan(vera, lambda m: m.base_model.model)  # a root below the tuner, which holds the shared projections
    vblora = dpeft.VBLoRAConfig(target_modules=["lin0"], vector_length=2, num_vectors=4)
    with pytest.raises(ValueError, match="vector_bank is trainable but registered nowhere .* pass the PeftModel"):
        _plan(vblora, lambda m: torch.nn.Linear(1, 1))
