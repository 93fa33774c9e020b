"""The sharded store backend against the local one, on 2 (and 4) gloo CPU ranks.

Every rank builds the same model twice: a local reference that sees the whole batch, and a sharded copy that sees
its 1/W rows; the sharded forward must equal the local one and each rank's shard gradient must equal its rows of
the local full gradient (the backend averages over ranks, and equal halves' mean is the full batch's mean).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))

from dist_utils import run_distributed  # noqa: E402
from models import build  # noqa: E402

import dpeft  # noqa: E402

pytestmark = pytest.mark.dist

CONFIGS = {
    "lora": lambda: dpeft.LoraConfig(target_modules="all-linear", r=6, init_lora_weights=False),
    "dora": lambda: dpeft.LoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], r=3, use_dora=True, init_lora_weights=False
    ),
    "lora-mts": lambda: dpeft.LoraConfig(
        target_modules=["q_proj", "o_proj"], r=5, init_lora_weights=False, modules_to_save=["lm_head"]
    ),
}


# Config names whose adapters route rows by task (Poly, multitask prompt tuning): inputs carry `task_ids` (tasks 0
# and 1 alternating over the global batch) and the models run in eval mode (Poly samples its routing in training);
# and names whose adapters have no merged form (the merge check is skipped).
TASK_ROUTED: set[str] = set()
NOT_MERGEABLE: set[str] = set()


def _loss(model, ids: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, **extra).loss


def _parity(config_name: str) -> dict:
    """Forward and gradients of the sharded model on this rank's rows against the local model on all rows."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    base, _ = build("llama")
    twin = copy.deepcopy(base)
    torch.manual_seed(rank)  # different per rank on purpose: shard() must take rank 0's values
    local = dpeft.get_peft_model(base, CONFIGS[config_name]())
    torch.manual_seed(rank)  # same draws as `local` on this rank; ranks differ
    sharded = dpeft.get_peft_model(twin, CONFIGS[config_name]())
    sharded.store.shard()
    # rank 0's values are the reference everywhere
    for p in local.store.parameters():
        dist.broadcast(p.data, 0)
    ids = torch.randint(0, 64, (2 * world, 8), generator=torch.Generator().manual_seed(7))
    mine = ids.chunk(world)[rank]
    extra = {"task_ids": torch.arange(2 * world) % 2} if config_name in TASK_ROUTED else {}
    my_extra = {k: v.chunk(world)[rank] for k, v in extra.items()}
    if extra:  # Poly samples its routing in training mode (per-process draws): compare deterministic forwards
        local.eval()
        sharded.eval()

    ref = _loss(local, ids, **extra)
    ref.backward()
    out = _loss(sharded, mine, **my_extra)
    out.backward()
    loss_mean = out.detach().clone()
    dist.all_reduce(loss_mean)
    loss_mean /= world
    # per-row logits: the sharded forward on my rows equals the local forward on the same rows
    with torch.no_grad():
        diff = sharded(input_ids=mine, **my_extra).logits - local(input_ids=mine, **my_extra).logits
        logit_diff = diff.abs().max().item()

    local_params = dict(local.store.param_keys())
    by_key = {local_params[id(p)][0]: p for p in local.store.parameters() if id(p) in local_params}
    grad_diff, value_diff, checked, shard_numel, full_numel = 0.0, 0.0, 0, 0, 0
    for p in sharded.store.parameters():
        if id(p) not in sharded.store.param_keys():
            continue  # a non-persistent tensor (e.g. AdaLoRA's ranknum): no checkpoint key, set by its init
        key, shape, is_sharded = sharded.store.param_keys()[id(p)]
        ref_p = by_key[key]
        ref_g = ref_p.grad if ref_p.grad is not None else torch.zeros_like(ref_p)  # frozen tensors have no grad
        if is_sharded:
            chunk = math.ceil(shape[0] / world)
            rows = slice(min(shape[0], rank * chunk), min(shape[0], (rank + 1) * chunk))
            want_v, want_g = ref_p.detach()[rows], ref_g[rows]
        else:
            want_v, want_g = ref_p.detach(), ref_g
        assert p.shape == want_v.shape, (key, p.shape, want_v.shape)
        value_diff = max(value_diff, (p.detach() - want_v).abs().max().item() if p.numel() else 0.0)
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        grad_diff = max(grad_diff, (grad - want_g).abs().max().item() if p.numel() else 0.0)
        checked += 1
        shard_numel += p.numel()
        full_numel += math.prod(shape)
    full_sd = sharded.store.state_dict("default")
    sd_diff = max((full_sd[k] - v).abs().max().item() for k, v in local.store.state_dict("default").items())
    names = sorted(n for n, _ in sharded.named_parameters() if "lora_A" in n)[:1]
    # save_pretrained on every rank (the gather is collective; rank 0 writes) and merging gather correctly too
    with tempfile.TemporaryDirectory() as tmp:
        sharded.save_pretrained(tmp, is_main_process=rank == 0)
        saved = load_file(os.path.join(tmp, "adapter_model.safetensors")) if rank == 0 else None
    # What the local model saves (PEFT's keys; for prompt learning the encoder's output, not the store's tensors).
    want = dpeft.get_peft_model_state_dict(local)
    saved = want if saved is None else saved
    assert set(saved) == set(want), sorted(set(saved) ^ set(want))[:5]
    saved_diff = max((saved[k] - v).abs().max().item() for k, v in want.items())
    merged_diff = None  # an adapter without a merged form (prompt learning, per-task routing)
    if config_name not in NOT_MERGEABLE:
        with torch.no_grad():
            sharded.merge_adapter()
            local.merge_adapter()
            merged_diff = (sharded(input_ids=mine).logits - local(input_ids=mine).logits).abs().max().item()
    return dict(
        loss_diff=abs(loss_mean.item() - ref.item()),
        logit_diff=logit_diff,
        grad_diff=grad_diff,
        value_diff=value_diff,
        sd_diff=sd_diff,
        saved_diff=saved_diff,
        merged_diff=merged_diff,
        checked=checked,
        shard_numel=shard_numel,
        full_numel=full_numel,
        backend=sharded.store.backend,
        param_name=names,
        named_shape=[tuple(p.shape) for n, p in sharded.named_parameters() if n in names],
    )


def _mixed_adapters() -> dict:
    """A second adapter added after `shard()` (sharded by calling it again), then a mixed-adapter batch."""
    import torch.distributed as dist

    rank = dist.get_rank()
    base, _ = build("llama")
    twin = copy.deepcopy(base)
    models = []
    for model_base in (base, twin):
        torch.manual_seed(0)
        model = dpeft.get_peft_model(model_base, CONFIGS["lora"]())
        model.add_adapter("other", CONFIGS["dora"]())
        models.append(model)
    local, sharded = models
    sharded.store.shard()
    for model in (sharded, local):
        torch.manual_seed(1)
        model.add_adapter("third", CONFIGS["lora"]())
    sharded.store.shard()  # idempotent for the first two, shards "third"
    for p in local.store.parameters():
        dist.broadcast(p.data, 0)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(rank))
    # Rank 1 has no row for "other" and another order: the layers still make the same gathers on every rank.
    routing = ["other", "default", "__base__", "third"] if rank == 0 else ["third", "default", "default", "__base__"]
    with torch.no_grad():
        ours = sharded(input_ids=ids, adapter_names=routing).logits
        diff = ours - local(input_ids=ids, adapter_names=routing).logits
        sharded.set_adapter("other")  # one adapter only: partial use of the buckets of the others
        local.set_adapter("other")
        diff_other = (sharded(input_ids=ids).logits - local(input_ids=ids).logits).abs().max().item()
    sharded_keys = sorted(k for k, (_, _, is_sharded) in sharded.store.param_keys().items() if is_sharded)
    return {
        "mixed_diff": diff.abs().max().item(),
        "other_diff": diff_other,
        "n_sharded": len(sharded_keys),
        "n_total": len(sharded.store.param_keys()),
    }


def _parity_all(names: list[str]) -> dict:
    # One spawn for all configs: starting ranks costs more than the checks.
    return {**{name: _parity(name) for name in names}, "mixed": _mixed_adapters()}


def test_sharded_forward_backward_equals_local():
    names = list(CONFIGS)
    per_rank = run_distributed(_parity_all, 2, names)
    for name in names:
        _check_parity(name, [r[name] for r in per_rank])
    for r in per_rank:
        mixed = r["mixed"]
        assert mixed["mixed_diff"] < 1e-5 and mixed["other_diff"] < 1e-5, mixed
        assert mixed["n_sharded"] == mixed["n_total"], mixed  # the adapter added after shard() was sharded too


def _check_parity(config_name: str, results: list[dict]) -> None:
    for rank, r in enumerate(results):
        assert r["backend"] == "sharded"
        assert r["checked"] > 0
        assert r["loss_diff"] < 1e-6, (rank, r)
        assert r["logit_diff"] < 1e-5, (rank, r)
        assert r["value_diff"] == 0.0, (rank, r)
        assert r["grad_diff"] < 1e-6, (rank, r)
        assert r["sd_diff"] == 0.0 and r["saved_diff"] == 0.0, (rank, r)
        assert r["merged_diff"] < 1e-5, (rank, r)
        # named_parameters shows shards at PEFT's module paths
        assert r["param_name"] and r["param_name"][0].endswith("lora_A.default.weight")
    if config_name == "lora":
        total = results[0]["full_numel"]
        assert sum(r["shard_numel"] for r in results) == total
        assert all(r["shard_numel"] <= total / 2 * 1.05 for r in results)
