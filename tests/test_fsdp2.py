"""The fsdp2 store backend (`dpeft.dist.fsdp.apply_fsdp`) against one process, on 2 gloo CPU ranks.

Every rank builds the same model twice: a local reference that sees the whole batch and an FSDP2-wrapped copy
that sees its 1/W rows. Tolerances come from float32 summation order only (the loss of the halves averaged vs the
whole batch's, and FSDP2's reduce-scatter averaging): 1e-5 on losses/logits of order 1-5, 1e-6 on gradients.
Every other method: tests/test_fsdp2_methods.py. accelerate's FSDP2 plugin: `test_accelerate_fsdp2_plugin`.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from dist_utils import run_distributed
from models import build
from safetensors.torch import load_file

import dpeft
from dpeft.store.integrity import AdapterIntegrityError

pytestmark = pytest.mark.dist

CONFIGS = {
    "lora": lambda: dpeft.LoraConfig(target_modules="all-linear", r=6, init_lora_weights=False),
    "dora": lambda: dpeft.LoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], r=3, use_dora=True, init_lora_weights=False
    ),
    "ia3": lambda: dpeft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
}


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _pair(config_name: str):
    """(local reference, FSDP2-wrapped twin) with equal adapter values on every rank."""
    from dpeft.dist.fsdp import apply_fsdp

    base, _ = build("llama")
    twin = copy.deepcopy(base)
    torch.manual_seed(0)
    local = dpeft.get_peft_model(base, CONFIGS[config_name]())
    torch.manual_seed(0)
    wrapped = apply_fsdp(dpeft.get_peft_model(twin, CONFIGS[config_name]()))
    return local, wrapped


def _parity(config_name: str) -> dict:
    """Loss, gradients, full state dict, save_pretrained and merge_and_unload of FSDP2 vs the local model."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    local, wrapped = _pair(config_name)
    ids = torch.randint(0, 64, (2 * world, 8), generator=torch.Generator().manual_seed(7))
    mine = ids.chunk(world)[rank]
    ref = _loss(local, ids)
    ref.backward()
    out = _loss(wrapped, mine)
    out.backward()
    loss_mean = out.detach().clone()
    dist.all_reduce(loss_mean)
    loss_mean /= world
    keys = wrapped.store.param_keys()
    local_by_key = {local.store.param_keys()[id(p)][0]: p for p in local.store.parameters()}
    grad_diff, all_dtensor = 0.0, True
    for p in wrapped.store.optimizer_parameters():
        all_dtensor &= isinstance(p, DTensor)
        ref_p = local_by_key[keys[id(p)][0]]
        grad = p.grad.full_tensor() if p.grad is not None else torch.zeros(p.shape)
        grad_diff = max(grad_diff, (grad - ref_p.grad).abs().max().item())
    with torch.no_grad():
        logit_diff = (wrapped(input_ids=mine).logits - local(input_ids=mine).logits).abs().max().item()
        # `generate` runs the inner model's forward: FSDP2 must still gather the root's embeddings and head.
        prompt = mine[:1, :4]
        generated = wrapped.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
        same_generation = torch.equal(generated, local.generate(input_ids=prompt, max_new_tokens=3, do_sample=False))
    full = wrapped.store.state_dict("default")
    sd_diff = max((full[k] - v).abs().max().item() for k, v in local.store.state_dict("default").items())
    with tempfile.TemporaryDirectory() as tmp:
        wrapped.save_pretrained(tmp, is_main_process=rank == 0)
        saved = load_file(os.path.join(tmp, "adapter_model.safetensors")) if rank == 0 else full
    saved_diff = max((saved[k] - v).abs().max().item() for k, v in full.items())
    merged = wrapped.merge_and_unload()
    ref_merged = local.merge_and_unload()
    with torch.no_grad():
        merged_diff = (merged(input_ids=mine).logits - ref_merged(input_ids=mine).logits).abs().max().item()
    ref_weights = ref_merged.state_dict()
    weight_diff = max((t - ref_weights[k]).abs().max().item() for k, t in merged.state_dict().items())
    return dict(
        backend=wrapped.store.backend,
        all_dtensor=all_dtensor,
        n_params=len(keys),
        loss_diff=abs(loss_mean.item() - ref.item()),
        grad_diff=grad_diff,
        logit_diff=logit_diff,
        sd_diff=sd_diff,
        saved_diff=saved_diff,
        merged_diff=merged_diff,
        weight_diff=weight_diff,
        merged_plain=all(type(p) is torch.nn.Parameter for p in merged.parameters()),
        same_generation=same_generation and generated.shape[1] > 4,
        root_methods_restored="generate" not in vars(wrapped),
    )


def _integrity() -> dict:
    """A gather that loses a tensor (zeros), a NaN and a wrong shape are refused by save_pretrained; nothing is
    written."""
    import torch.distributed as dist

    from dpeft.store import fsdp_view
    from dpeft.store import store as store_module

    rank = dist.get_rank()
    _, wrapped = _pair("lora")
    out = {}
    real = store_module.full_value
    corruptions = {
        "zeros": lambda t: torch.zeros_like(t),
        "nan": lambda t: t.clone().fill_(float("nan")),
        "shape": lambda t: t.new_zeros(0),
    }
    for name, corrupt in corruptions.items():
        hit = {"n": 0}

        def bad_full(tensor, corrupt=corrupt, hit=hit):
            value = real(tensor)
            hit["n"] += 1
            return corrupt(value) if hit["n"] == 3 else value  # one tensor of the adapter

        store_module.full_value = bad_full
        with tempfile.TemporaryDirectory() as tmp:
            try:
                wrapped.save_pretrained(tmp, is_main_process=rank == 0)
                out[name] = ("saved", os.listdir(tmp))
            except AdapterIntegrityError as exc:
                out[name] = (str(exc), os.listdir(tmp))
            finally:
                store_module.full_value = real
    assert fsdp_view.full_value is real
    wrapped.add_adapter("late", CONFIGS["lora"]())  # FSDP2 does not manage tensors declared after wrapping
    wrapped.set_adapter("late")
    try:
        wrapped(input_ids=torch.zeros(1, 4, dtype=torch.long))
    except ValueError as exc:
        out["late"] = str(exc)
    return out


def _mixed_precision() -> dict:
    """bf16 compute / fp32 reduce (FSDP2's MixedPrecisionPolicy): the loss stays near fp32's, state stays fp32."""
    from dpeft.dist.fsdp import apply_fsdp, mixed_precision

    local, _ = _pair("lora")
    base, _ = build("llama")
    torch.manual_seed(0)
    policy = mixed_precision("bfloat16", "float32")
    wrapped = apply_fsdp(dpeft.get_peft_model(base, CONFIGS["lora"]()), mp_policy=policy)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = abs(_loss(wrapped, ids).item() - _loss(local, ids).item())
    dtypes = {str(t.dtype) for t in wrapped.store.state_dict("default").values()}
    return {"loss_diff": diff, "dtypes": dtypes}


def _prompt_generate() -> bool:
    """`generate` of a wrapped prompt-tuning model (the root gathers the encoder, embeddings and head) equals one
    process's."""
    from dpeft.dist.fsdp import apply_fsdp

    base, _ = build("llama")
    twin = copy.deepcopy(base)
    config = lambda: dpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)  # noqa: E731
    torch.manual_seed(0)
    local = dpeft.get_peft_model(base, config())
    torch.manual_seed(0)
    wrapped = apply_fsdp(dpeft.get_peft_model(twin, config()))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = wrapped.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        return torch.equal(ours, local.generate(input_ids=ids, max_new_tokens=3, do_sample=False))


def _all(names: list[str]) -> dict:
    # One spawn for everything: starting ranks costs more than the checks.
    out = {name: _parity(name) for name in names}
    return {**out, "integrity": _integrity(), "mixed_precision": _mixed_precision(), "prompt": _prompt_generate()}


def test_fsdp2_equals_one_process_and_refuses_corrupt_saves():
    names = list(CONFIGS)
    per_rank = run_distributed(_all, 2, names, timeout=400)
    for name in names:
        for rank, r in enumerate(per_rank):
            r = r[name]
            assert r["backend"] == "local"  # merge_and_unload unwrapped the model
            assert r["all_dtensor"] and r["n_params"] > 0, (name, rank, r)
            assert r["loss_diff"] < 1e-5, (name, rank, r)
            assert r["grad_diff"] < 1e-6, (name, rank, r)
            assert r["logit_diff"] < 1e-5, (name, rank, r)
            assert r["sd_diff"] == 0.0 and r["saved_diff"] == 0.0, (name, rank, r)
            assert r["merged_diff"] < 1e-5 and r["weight_diff"] < 1e-6, (name, rank, r)
            assert r["merged_plain"], (name, rank)
            assert r["same_generation"] and r["root_methods_restored"], (name, rank, r)
    for r in per_rank:
        assert r["prompt"], "generate of an FSDP2-wrapped prompt-tuning model differs from one process"
        mp = r["mixed_precision"]
        assert 0 < mp["loss_diff"] < 0.05 and mp["dtypes"] == {"torch.float32"}, mp  # bf16 rounding, not fp32
        found = r["integrity"]
        assert "all zeros, but the model holds nonzero values" in found["zeros"][0], found
        assert "non-finite" in found["nan"][0], found
        assert "shape (0,), but its adapter config implies" in found["shape"][0], found
        assert "was added after apply_fsdp" in found.pop("late"), found
        for message, written in found.values():
            assert "base_model.model.model.layers.0" in message
            assert written == [], found  # nothing was published


def _fsdp2_accelerator():
    """An `Accelerator` with accelerate's FSDP2 plugin on these gloo CPU ranks.

    accelerate 1.15 turns its FSDP plugin on only for accelerator devices: on CPU ranks it reports MULTI_CPU and
    wraps the model in DDP. Setting the state's distributed type to FSDP runs its real FSDP2 `prepare` code here.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    accelerator.state.distributed_type = DistributedType.FSDP  # (the shared state: set again before each prepare)
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2 and accelerator.num_processes == 2
    return accelerator


def _accelerate() -> dict:
    """apply_fsdp, then accelerator.prepare(model, optimizer): 3 SGD steps and a save against one process; and a
    model prepared without apply_fsdp, which dpeft refuses on forward and on save."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    accelerator = _fsdp2_accelerator()
    local, wrapped = _pair("lora")
    ids = torch.randint(0, 64, (2 * world, 8), generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.SGD(wrapped.store.optimizer_parameters(), lr=0.5)
    prepared, optimizer = accelerator.prepare(wrapped, optimizer)
    ref_optimizer = torch.optim.SGD([p for p in local.parameters() if p.requires_grad], lr=0.5)
    loss_diff = 0.0
    for _ in range(3):
        ref = _loss(local, ids)
        ref.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        loss = _loss(prepared, ids.chunk(world)[rank])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        mean = accelerator.reduce(loss.detach(), reduction="mean")
        loss_diff = max(loss_diff, abs(mean.item() - ref.item()))
    with tempfile.TemporaryDirectory() as tmp:
        wrapped.save_pretrained(tmp, is_main_process=accelerator.is_main_process)
        saved = load_file(os.path.join(tmp, "adapter_model.safetensors")) if rank == 0 else None
    expected = local.store.state_dict("default")
    out = {
        "same_model": prepared is wrapped,
        "backend": wrapped.store.backend,
        "loss_diff": loss_diff,
        "saved_diff": max((saved[k] - v).abs().max().item() for k, v in expected.items()) if rank == 0 else 0.0,
    }
    torch.manual_seed(0)
    unwrapped = dpeft.get_peft_model(build("llama")[0], CONFIGS["lora"]())
    # accelerate's own fully_shard (it wants the optimizer too): the store does not know the DTensors.
    accelerator = _fsdp2_accelerator()
    plain, _ = accelerator.prepare(unwrapped, torch.optim.SGD(unwrapped.store.optimizer_parameters(), lr=0.5))
    out["plain_wrapped"] = type(plain).__name__
    for what, call in [
        ("forward", lambda: plain(input_ids=ids)),
        ("save", lambda: unwrapped.save_pretrained(tempfile.mkdtemp(), is_main_process=rank == 0)),
    ]:
        try:
            call()
            out[what] = "accepted"
        except ValueError as exc:
            out[what] = str(exc)
    return out


def test_accelerate_fsdp2_plugin():
    """A model wrapped by apply_fsdp and then prepared by accelerate's FSDP2 plugin trains and saves like one
    process (accelerate leaves an FSDP2 module as it is); one that accelerate wrapped by itself is refused with an
    error naming apply_fsdp, before a step could silently not train it or a save write its initial values."""
    per_rank = run_distributed(_accelerate, 2, timeout=400)
    for rank, r in enumerate(per_rank):
        assert r["same_model"] and r["backend"] == "fsdp2" and r["plain_wrapped"] == "FSDPPeftModel", (rank, r)
        assert r["loss_diff"] < 1e-5 and r["saved_diff"] < 1e-5, (rank, r)
        assert "dpeft.dist.fsdp.apply_fsdp(model) first" in r["forward"], (rank, r["forward"])
    # Only the main process writes (and reads the tensors) on the local backend the store still thinks it has.
    assert "dpeft.dist.fsdp.apply_fsdp(model) first" in per_rank[0]["save"], per_rank[0]["save"]


def test_projected_tensors_are_refused_before_wrapping():
    """OFT's coft projects its tensors in place before each read, which fsdp2 cannot write back: refused before any
    process group or mesh is needed, the store left local."""
    from dpeft.dist.fsdp import apply_fsdp

    config = dpeft.OFTConfig(target_modules=["q_proj"], oft_block_size=4, coft=True, task_type="CAUSAL_LM")
    model = dpeft.get_peft_model(build("llama")[0], config)
    with pytest.raises(ValueError, match="projected in place.*fsdp2 store backend does not support.*constraint off"):
        apply_fsdp(model)
    assert model.store.backend == "local"
