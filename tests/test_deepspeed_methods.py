"""Every registered method under DeepSpeed ZeRO-2 and ZeRO-3 (2 gloo CPU ranks, ``DS_ACCELERATOR=cpu``) against one
plain process with the same global batch, with no per-method code.

The table reuses the rows the `sharded` backend's per-method parity runs (tests/test_sharded_store.py CONFIGS and
tests/test_methods_interop.py SHARDED_CONFIGS: random, non-identity init on the tiny Llama, no dropout, so the two
runs see the same numbers), the prompt-learning rows of test_methods_interop's PARITY table, and two task-routed rows
(Poly, multitask prompt tuning). Each rank trains every row in turn in ONE spawned job per stage (process start and
the deepspeed import are the cost): `apply_deepspeed`, STEPS optimizer steps on its half of each global batch, then
`save_pretrained` and, under ZeRO-3, a distributed checkpoint. The parent checks, per row: the losses equal the
one-process run's; the saved adapter holds the one-process adapter's keys, shapes and values; dpeft and HF PEFT load
it and give the one-process model's outputs; under ZeRO-3 the checkpoint (saved at W=2) exported in one process
(W=1) gives the same adapter.

Tolerance: 1e-5 absolute on losses (near 4), adapter tensors and logits (order 1): float32 with a different reduction
order only (per-rank means, DeepSpeed's gradient averaging and its flat fp32 master copies); measured differences
are ~1e-7.

ZeRO-3 runs set ``stage3_param_persistence_threshold=0``: DeepSpeed's default keeps tensors under 1e5 elements (all
of this tiny model) whole on every rank, which would leave the partitioned paths untested.
`test_every_registered_method_is_covered` fails when a registered method has neither a row nor a stated reason.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from dist_utils import run_distributed
from models import tiny_llama

import dpeft
from dpeft.methods import registered_methods

pytestmark = pytest.mark.dist
ATOL = 1e-5
GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 8, 64, 3
N_TASKS = 2  # task-routed rows (Poly) get one task index per row in [0, N_TASKS)
SEED = 11
# The default test: store-shared tensors; an int tensor under no module; a prompt read outside any layer.
CHEAP = ["vera", "shira", "prompt-tuning"]
# Registered methods without a row here, each with the reason (the coverage test reads this).
LEFT_OUT = {
    "ADALORA": "refused before DeepSpeed starts (test_unsupported_methods_are_refused_before_deepspeed_starts): its "
    "regulariser and rank allocation read gradients and tensors that DeepSpeed keeps in ZeRO partitions",
}
# Rows whose adapter HF PEFT 0.21.2 cannot load on CPU (the saved file is checked against one process all the same,
# and dpeft loads it): PEFT builds BOFT with boft_n_butterfly_factor > 1 as 1 factor on CPU (issue 6 notes).
PEFT_CANNOT_LOAD = {"boft"}
# Rows trained in eval mode: in training mode Poly's router samples relaxed-Bernoulli noise per row, which one
# process (4 rows) and two ranks (2 rows each) draw differently.
EVAL_MODE = {"poly"}


# Rows not in the reused tables: task-routed methods (their inputs carry task_ids).
EXTRA = {
    "poly": lambda: dpeft.PolyConfig(
        target_modules=["q_proj", "v_proj"], n_tasks=N_TASKS, n_skills=3, init_weights=False, task_type="CAUSAL_LM"
    ),
    "multitask-prompt-tuning": lambda: dpeft.MultitaskPromptTuningConfig(
        num_virtual_tokens=4, num_tasks=N_TASKS, task_type="CAUSAL_LM"
    ),
}


def cases() -> dict[str, dpeft.PeftConfig]:
    """name -> config of every row (the parent builds them: configs pickle, the factories do not): the `sharded`
    backend's per-method rows, the prompt-learning rows of the PARITY table (no dropout there) and EXTRA."""
    import test_methods_interop
    import test_sharded_store

    prompt = {p.id: p.values[0] for p in test_methods_interop.PARITY if p.values[0]().is_prompt_learning}
    factories = {**test_sharded_store.CONFIGS, **test_methods_interop.SHARDED_CONFIGS, **prompt, **EXTRA}
    configs = {name: factory() for name, factory in factories.items()}
    return {name: c for name, c in configs.items() if c.peft_type not in LEFT_OUT}


def _batches(config: dpeft.PeftConfig) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches; with task_ids for a task-routed config (one with a number of tasks)."""
    tasks = getattr(config, "n_tasks", None) or getattr(config, "num_tasks", None)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        batch = {"input_ids": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)}
        if tasks:
            batch["task_ids"] = torch.randint(0, tasks, (GLOBAL_BATCH,), generator=gen)
        out.append(batch)
    return out


def _model(config: dpeft.PeftConfig):
    base = tiny_llama()
    torch.manual_seed(SEED)  # the same adapter init on every rank and in the reference
    return dpeft.get_peft_model(base, copy.deepcopy(config))


def _optimizer(model) -> torch.optim.Optimizer:
    # SGD with momentum, not Adam: Adam divides by each element's gradient size, so an element whose gradient is
    # float noise (1e-7 relative, from the reduction order) gets an update of full size in a random direction.
    return torch.optim.SGD(model.store.optimizer_parameters(), lr=0.2, momentum=0.9)


def _loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def reference(name: str, config: dpeft.PeftConfig, directory: str) -> tuple[list[float], dict, torch.Tensor, dict]:
    """One process, the same optimizer on the whole global batch; saves the adapter to `directory` and returns (losses,
    the saved tensors, logits on the first batch, that batch)."""
    from safetensors.torch import load_file

    model = _model(config)
    opt = _optimizer(model)
    batches = _batches(config)
    losses = []
    model.train(name not in EVAL_MODE)
    for batch in batches:
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(**batches[0]).logits
    model.save_pretrained(directory)
    return losses, load_file(os.path.join(directory, "adapter_model.safetensors")), logits, batches[0]


def _train_zero(name: str, config: dpeft.PeftConfig, stage: int, tmp: str) -> list[float]:
    """This rank's part of one row: train under ZeRO `stage`, save the adapter (and a checkpoint under ZeRO-3)."""
    import torch.distributed as dist

    from dpeft.checkpoint.dcp import save_checkpoint
    from dpeft.dist import deepspeed as ds

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world
    model = _model(config)
    opt = _optimizer(model)
    ds_config = ds.deepspeed_config(stage, micro_batch_size=per_rank, param_persistence_threshold=0)
    engine = ds.apply_deepspeed(model, opt, config=ds_config)
    engine.train(name not in EVAL_MODE)
    losses = []
    for batch in _batches(config):
        mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        loss = _loss(engine, mine)  # equal halves: the mean of the rank means is the global mean
        engine.backward(loss)  # DeepSpeed averages gradients over ranks
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    model.save_pretrained(os.path.join(tmp, name, "adapter"), is_main_process=rank == 0)
    if stage == 3:
        save_checkpoint(os.path.join(tmp, name, "ckpt"), STEPS, model, engine.optimizer, {"step": STEPS})
    return losses


def _zero_worker(cases: dict[str, dpeft.PeftConfig], stages: list[int], tmp: str) -> dict:
    """Every row under every stage in one process per rank: {stage: {name: losses, or the error of a failed row}}."""
    import traceback

    out: dict[int, dict[str, list[float] | str]] = {}
    for stage in stages:
        out[stage] = {}
        for name, config in cases.items():
            try:
                out[stage][name] = _train_zero(name, config, stage, os.path.join(tmp, f"zero{stage}"))
            except Exception:  # noqa: BLE001 - reported per row by the parent
                out[stage][name] = traceback.format_exc()
    return out


def _peft_logits(adapter_dir: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import peft

    model = peft.PeftModel.from_pretrained(tiny_llama(), adapter_dir).eval()
    with torch.no_grad():
        return model(**batch).logits


def _dpeft_logits(adapter_dir: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model = dpeft.PeftModel.from_pretrained(tiny_llama(), adapter_dir).eval()
    with torch.no_grad():
        return model(**batch).logits


def _diff(a: torch.Tensor, b: torch.Tensor) -> float | str:
    return (a.float() - b.float()).abs().max().item() if a.shape == b.shape else f"shape {a.shape} != {b.shape}"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or bool((a.float() - b.float()).abs().max() <= ATOL)


def check_row(name: str, ref: tuple, losses: list[float] | str, tmp: str, stage: int) -> list[str]:
    """The problems of one row's ZeRO run against the one-process reference `ref` (empty when it passes)."""
    from safetensors.torch import load_file

    if isinstance(losses, str):
        return [f"{name}: the ZeRO-{stage} run failed:\n{losses}"]
    ref_losses, ref_state, ref_logits, batch = ref
    problems = [] if ref_losses[-1] != ref_losses[0] else [f"{name}: one process did not train: losses {ref_losses}"]
    if not _close(torch.tensor(losses), torch.tensor(ref_losses)):
        problems.append(f"{name}: ZeRO-{stage} losses {losses} != one process {ref_losses}")
    dirs = {"saved": os.path.join(tmp, name, "adapter")}
    if stage == 3:  # saved at world size 2, exported in this one process
        from dpeft.checkpoint.export import export_checkpoint

        dirs["exported"] = os.path.join(tmp, name, "exported")
        export_checkpoint(os.path.join(tmp, name, "ckpt"), dirs["exported"])
    for kind, directory in dirs.items():
        saved = load_file(os.path.join(directory, "adapter_model.safetensors"))
        if saved.keys() != ref_state.keys():
            problems.append(f"{name}: ZeRO-{stage} {kind} keys differ: {sorted(saved.keys() ^ ref_state.keys())[:4]}")
            continue
        bad = {k: _diff(saved[k], v) for k, v in ref_state.items() if not _close(saved[k], v)}
        if bad:
            problems.append(f"{name}: ZeRO-{stage} {kind} tensors differ from one process (max |diff|): {bad}")
    loaders = {"dpeft": _dpeft_logits, "HF PEFT": _peft_logits}
    if name in PEFT_CANNOT_LOAD:
        del loaders["HF PEFT"]
    for library, logits_of in loaders.items():
        try:
            logits = logits_of(dirs["saved"], batch)
        except Exception as exc:  # noqa: BLE001 - one row's failure is reported with the others'
            problems.append(f"{name}: {library} cannot load the ZeRO-{stage} adapter: {exc!r}")
            continue
        if not _close(logits, ref_logits):
            diff = (logits - ref_logits).abs().max().item() if logits.shape == ref_logits.shape else logits.shape
            problems.append(f"{name}: {library} on the ZeRO-{stage} adapter differs from one process by {diff}")
    return problems


def run_table(names: list[str] | None, stages: list[int], tmp: str) -> None:
    """Run the rows `names` (None: all) under each of `stages` in one spawned 2-rank job and check every row."""
    rows = cases()
    if names is not None:
        rows = {n: rows[n] for n in names}
    per_rank = run_distributed(_zero_worker, 2, rows, stages, tmp, timeout=1200)
    problems = []
    for name, config in rows.items():
        ref = reference(name, config, os.path.join(tmp, "one-process", name))
        for stage in stages:
            problems += check_row(name, ref, per_rank[0][stage][name], os.path.join(tmp, f"zero{stage}"), stage)
    assert not problems, "\n".join(problems)


def test_every_registered_method_is_covered() -> None:
    covered = {config.peft_type for config in cases().values()} | set(LEFT_OUT)
    missing = sorted(set(registered_methods()) - covered)
    assert not missing, f"add a row for {missing} to tests/test_deepspeed_methods.py (or a reason to LEFT_OUT)"


REFUSED = {
    "adalora": (
        lambda: dpeft.AdaLoraConfig(target_modules=["q_proj"], r=4, init_r=4, total_step=10, task_type="CAUSAL_LM"),
        "ADALORA.*deepspeed backend cannot run.*sharded or fsdp2",
    ),
    "oft-coft": (
        lambda: dpeft.OFTConfig(target_modules=["q_proj"], oft_block_size=4, coft=True, task_type="CAUSAL_LM"),
        "projected in place.*deepspeed store backend does not support",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_methods_are_refused_before_deepspeed_starts(name: str) -> None:
    """Refused by `apply_deepspeed` (and accelerate's path) before DeepSpeed starts, the store left local."""
    from dpeft.dist.deepspeed import apply_deepspeed, prepare_for_accelerate

    factory, message = REFUSED[name]
    model = dpeft.get_peft_model(tiny_llama(), factory())
    optimizer = torch.optim.SGD(model.store.optimizer_parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        apply_deepspeed(model, optimizer, zero_stage=2)
    with pytest.raises(ValueError, match=message):
        prepare_for_accelerate(model)
    assert model.store.backend == "local"


def test_cheap_rows_match_single_process(tmp_path) -> None:
    """The default-suite subset: ZeRO-2 then ZeRO-3 in one spawned job (~40 s of it is starting DeepSpeed)."""
    run_table(CHEAP, [2, 3], str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_every_method_matches_single_process(stage: int, tmp_path) -> None:
    run_table(None, [stage], str(tmp_path))
