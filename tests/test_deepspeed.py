"""The `deepspeed` store backend: ZeRO-2/3 on 2 gloo CPU ranks against one plain process with the same global batch.

Each distributed run trains 3 steps, saves the adapter (`save_pretrained`) and a distributed checkpoint at step 3,
trains 2 more, then loads the step-3 checkpoint back into the running engine (resume into ZeRO) and trains the same
2 steps again; under ZeRO-3 it then merges with `dpeft.dist.deepspeed.merge_and_unload` and returns the gathered
merged weights. Tolerances: float32 with a different reduction order only (per-rank loss sums, DeepSpeed's
averaging of gradients and its flat fp32 master copies): 1e-5 absolute on losses near 4, 1e-5 on outputs and
merged weights of order 1 after 5 AdamW steps.

ZeRO-3 runs set ``stage3_param_persistence_threshold=0``: DeepSpeed's default keeps tensors under 1e5 elements (all
of this tiny model) whole on every rank, which would leave the partitioned paths untested.

DeepSpeed's start-up takes tens of seconds per rank on the shared 2-core box, so every DeepSpeed run is slow-marked.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed

import dpeft

pytestmark = pytest.mark.dist
ATOL = 1e-5
GLOBAL_BATCH, SEQ, VOCAB = 4, 8, 64
STEPS, SAVE_AT = 5, 3


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def _model(dora: bool):
    base = _base()
    lora = dpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora)
    return base, dpeft.get_peft_model(base, lora)


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def _loss_sum(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")


def _reference(dora: bool, tmp: str) -> dict:
    """One process, plain AdamW: the losses, the adapter after step SAVE_AT, outputs and merged weights at the end."""
    _, model = _model(dora)
    opt = torch.optim.AdamW(model.store.optimizer_parameters(), lr=1e-2)
    count = GLOBAL_BATCH * (SEQ - 1)
    losses, state = [], None
    for step, ids in enumerate(_batches()):
        loss = _loss_sum(model, ids) / count
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step + 1 == SAVE_AT:
            state = {k: v.clone() for k, v in model.store.state_dict("default").items()}
    merged = model.merge_and_unload().state_dict()
    return {"losses": losses, "state": state, "merged": {k: v.clone() for k, v in merged.items()}}


def _wrap(model, opt, stage: int, world: int, via: str):
    """(engine, backward-and-step) through `apply_deepspeed` or through accelerate's DeepSpeed plugin."""
    from dpeft.dist import deepspeed as ds

    if via == "apply":
        config = ds.deepspeed_config(stage, micro_batch_size=GLOBAL_BATCH // world, param_persistence_threshold=0)
        engine = ds.apply_deepspeed(model, opt, config=config)

        def backward(loss: torch.Tensor) -> None:
            engine.backward(loss)
            engine.step()

        return engine, backward
    from accelerate import Accelerator, DeepSpeedPlugin

    ds.prepare_for_accelerate(model)
    config = ds.deepspeed_config(stage, micro_batch_size=GLOBAL_BATCH // world, param_persistence_threshold=0)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    engine, _ = accelerator.prepare(model, opt)
    ds.attach_prepared(engine)
    return engine, accelerator.backward  # accelerate's DeepSpeed backward also steps the engine


def _ds_worker(stage: int, dora: bool, tmp: str, via: str = "apply") -> dict:
    from dpeft.checkpoint.dcp import load_checkpoint, save_checkpoint
    from dpeft.dist.deepspeed import gathered, merge_and_unload

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _, model = _model(dora)
    opt = torch.optim.AdamW(model.store.optimizer_parameters(), lr=1e-2)
    engine, backward = _wrap(model, opt, stage, world, via)
    count = GLOBAL_BATCH * (SEQ - 1)
    per_rank = GLOBAL_BATCH // world
    batches = _batches()

    def step(ids: torch.Tensor) -> float:
        mine = ids[rank * per_rank : (rank + 1) * per_rank]
        terms = _loss_sum(engine, mine)
        # DeepSpeed averages gradients over ranks: scale so the average is the global-batch mean's gradient.
        backward(terms * world / count)
        total = terms.detach().clone()
        torch.distributed.all_reduce(total)
        return total.item() / count

    losses = []
    for i, ids in enumerate(batches):
        losses.append(step(ids))
        if i + 1 == SAVE_AT:
            model.save_pretrained(os.path.join(tmp, "adapter"), is_main_process=rank == 0)
            save_checkpoint(os.path.join(tmp, "ckpt"), SAVE_AT, model, engine.optimizer, {"step": SAVE_AT})
    load_checkpoint(os.path.join(tmp, "ckpt", f"step-{SAVE_AT:08d}"), model, engine.optimizer)
    resumed = [step(ids) for ids in batches[SAVE_AT:]]
    out = {"losses": losses, "resumed": resumed, "backend": model.store.backend}
    if stage == 3:
        base = merge_and_unload(model)
        with gathered(list(base.parameters())):
            out["merged"] = {k: v.detach().clone() for k, v in base.state_dict().items()}
    return out


def _sharded_resume_worker(dora: bool, ckpt: str) -> list[float]:
    """Resume the ZeRO-3 checkpoint under the `sharded` backend and train the remaining steps."""
    from dpeft.checkpoint.dcp import load_checkpoint

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _, model = _model(dora)
    model.store.shard()
    opt = torch.optim.AdamW(model.store.optimizer_parameters(), lr=1e-2)
    load_checkpoint(ckpt, model, opt)
    count, per_rank = GLOBAL_BATCH * (SEQ - 1), GLOBAL_BATCH // world
    losses = []
    for ids in _batches()[SAVE_AT:]:
        terms = _loss_sum(model, ids[rank * per_rank : (rank + 1) * per_rank])
        (terms * world / count).backward()
        opt.step()
        opt.zero_grad()
        total = terms.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / count)
    return losses


def _peft_outputs(adapter_dir: str) -> torch.Tensor:
    import peft

    model = peft.PeftModel.from_pretrained(_base(), adapter_dir)
    with torch.no_grad():
        return model(input_ids=_batches()[0]).logits


def _dpeft_outputs(state: dict, dora: bool) -> torch.Tensor:
    _, model = _model(dora)
    model.store.load_state_dict("default", state)
    with torch.no_grad():
        return model(input_ids=_batches()[0]).logits


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_zero_matches_single_process(stage: int, dora: bool, tmp_path) -> None:
    ref = _reference(dora, str(tmp_path))
    out = run_distributed(_ds_worker, 2, stage, dora, str(tmp_path), timeout=600)
    assert out[0]["backend"] == "deepspeed"
    torch.testing.assert_close(torch.tensor(out[0]["losses"]), torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    # Resuming the step-3 checkpoint inside the running engine replays steps 4-5 exactly.
    resumed = torch.tensor(out[0]["resumed"])
    torch.testing.assert_close(resumed, torch.tensor(ref["losses"][SAVE_AT:]), atol=ATOL, rtol=0)
    # The exported adapter: right shapes and values, and HF PEFT loads it with the same outputs.
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in ref["state"].items()}
    for key, value in ref["state"].items():
        torch.testing.assert_close(saved[key], value, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        _peft_outputs(os.path.join(tmp_path, "adapter")), _dpeft_outputs(ref["state"], dora), atol=ATOL, rtol=0
    )
    if stage == 3:
        merged = out[0]["merged"]
        assert merged.keys() == ref["merged"].keys()
        for key, value in ref["merged"].items():
            torch.testing.assert_close(merged[key], value, atol=ATOL, rtol=0, msg=key)
        _check_zero3_checkpoint(dora, str(tmp_path), ref)


def _check_zero3_checkpoint(dora: bool, tmp: str, ref: dict) -> None:
    """A ZeRO-3 checkpoint exports at world size 1 and resumes under `sharded` at world size 2."""
    from safetensors.torch import load_file

    from dpeft.checkpoint.export import export_checkpoint

    ckpt = os.path.join(tmp, "ckpt", f"step-{SAVE_AT:08d}")
    export_checkpoint(ckpt, os.path.join(tmp, "exported"))
    exported = load_file(os.path.join(tmp, "exported", "adapter_model.safetensors"))
    for key, value in ref["state"].items():
        torch.testing.assert_close(exported[key], value, atol=ATOL, rtol=0)
    losses = run_distributed(_sharded_resume_worker, 2, dora, ckpt, timeout=300)[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["losses"][SAVE_AT:]), atol=ATOL, rtol=0)


def test_deepspeed_config_rejects_bad_stage() -> None:
    from dpeft.dist.deepspeed import deepspeed_config

    with pytest.raises(ValueError, match="zero_stage=1 is not available"):
        deepspeed_config(1)
    with pytest.raises(ValueError, match="offload_param needs ZeRO stage 3"):
        deepspeed_config(2, offload_param=True)
    assert deepspeed_config(3, micro_batch_size=2)["zero_optimization"] == {"stage": 3}


TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_llama.yaml")


def _run_overrides(out_dir: str, backend: str, steps: int) -> list[str]:
    return [
        "train.threads=1",
        "train.progress_bar=false",
        f"train.steps={steps}",
        "train.global_batch_size=8",
        "train.grad_accum_steps=2",
        "data.limit=64",
        "data.validation_size=8",
        "data.max_length=24",
        f"store.backend={backend}",
        "store.deepspeed_zero_stage=3",
        "checkpoint.every=2",
        f"output.dir={out_dir}",
    ]


def _run_worker(out_dir: str) -> tuple[list[float], list[float], str]:
    """`dpeft.train.run` under the deepspeed backend: 4 steps, then a new run to 6 steps resuming step 4."""
    from dpeft.train import run

    first = run(TINY, _run_overrides(out_dir, "deepspeed", 4))
    second = run(TINY, _run_overrides(out_dir, "deepspeed", 6))
    assert second.resumed_from is not None and second.resumed_from.endswith("step-00000004")
    return first.losses, second.losses, first.backend


@pytest.mark.slow
def test_train_run_zero3_matches_one_process_and_resumes(tmp_path) -> None:
    from dpeft.train import run

    threads = torch.get_num_threads()
    try:
        one = run(TINY, _run_overrides(str(tmp_path / "w1"), "local", 6))
    finally:
        torch.set_num_threads(threads)
    first, second, backend = run_distributed(_run_worker, 2, str(tmp_path / "w2"), timeout=600)[0]
    assert backend == "deepspeed"
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(one.losses), atol=2e-5, rtol=0)


@pytest.mark.slow
def test_accelerate_deepspeed_plugin_zero3(tmp_path) -> None:
    """A dpeft model prepared by `accelerate.Accelerator` with a ZeRO-3 DeepSpeed plugin trains, saves, checkpoints,
    resumes and merges like the single process (the ranks feed their own half of each global batch)."""
    ref = _reference(False, str(tmp_path))
    out = run_distributed(_ds_worker, 2, 3, False, str(tmp_path), "accelerate", timeout=600)[0]
    assert out["backend"] == "deepspeed"
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    resumed = torch.tensor(out["resumed"])
    torch.testing.assert_close(resumed, torch.tensor(ref["losses"][SAVE_AT:]), atol=ATOL, rtol=0)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))
    for key, value in ref["state"].items():
        torch.testing.assert_close(saved[key], value, atol=ATOL, rtol=0)
    for key, value in ref["merged"].items():
        torch.testing.assert_close(out["merged"][key], value, atol=ATOL, rtol=0, msg=key)
