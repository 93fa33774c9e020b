"""AdaLoRA under `dpeft.train.run`: the loop adds the orthogonal regulariser and calls `update_and_allocate` at PEFT's
documented point, and its checkpoints keep the allocator's importance averages and the rank pattern.

References and tolerances:
- A hand-written HF PEFT loop (PEFT's AdaLoRA model on the same base, seed, batches and AdamW; backward,
  ``optimizer.step()``, ``update_and_allocate(step)``, ``zero_grad()``): losses within 5e-6 at every step (the loop
  sums token losses and scales by 1/count where PEFT takes the mean: float32 rounding only, measured 9.9e-7 on
  losses near 6.5), rank pattern after the run identical, final adapter within 1e-5 (measured 6.7e-8).
- Resume from a mid-schedule checkpoint (inside the budgeting phase): losses within 1e-6 of the uninterrupted run,
  identical rank pattern and adapter (1e-6; measured 0.0); without the saved averages the run diverges.
- W=2 sharded, fsdp2 and local (all-reduce) vs one process (slow): losses within 2e-5 and adapters within 2e-4
  (tests/test_train_dist.py's bounds, summation order only); identical rank patterns; a W=2 checkpoint resumed at
  W=1 likewise.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from conftest import peft_config_of
from dist_utils import run_distributed
from models import build
from safetensors.torch import load_file

import dpeft
from dpeft.checkpoint.dcp import load_checkpoint, save_checkpoint
from dpeft.checkpoint.export import export_checkpoint
from dpeft.config.run_config import load_run_config
from dpeft.train import run
from dpeft.train.data import GlobalOrder, collate, load_splits
from dpeft.train.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
STEPS, MID = 12, 6  # budgeting phase: steps 3..8 (tinit=2, tfinal=3), so the checkpoint at 6 is mid-schedule
ADALORA = [
    "peft.peft_type=ADALORA",
    "peft.target_modules=[q_proj, v_proj, down_proj]",
    "peft.init_r=4",
    "peft.target_r=2",
    "peft.tinit=2",
    "peft.tfinal=3",
]
FAST = [
    "train.threads=1",
    "train.progress_bar=false",
    f"train.steps={STEPS}",
    "train.global_batch_size=8",
    "data.limit=64",
    "data.validation_size=8",
    "data.max_length=24",
    "optim.lr=0.01",
    *ADALORA,
]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _overrides(out: str, *extra: str) -> list[str]:
    return [*FAST, f"output.dir={out}", f"checkpoint.dir={out}/ckpt", *extra]


def _saved(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(rank pattern, tensors) of the PEFT-format adapter a run saved."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        pattern = json.load(f)["rank_pattern"]
    return pattern, load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))


def _assert_adapters_close(got: dict, want: dict, atol: float) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted local run, with a checkpoint every MID steps."""
    out = str(tmp_path_factory.mktemp("adalora") / "full")
    return run(TINY, _overrides(out, f"checkpoint.every={MID}"))


def _peft_reference(cfg) -> tuple[list[float], dict, dict[str, torch.Tensor]]:
    """PEFT's AdaLoRA trained by hand on the loop's batches: (losses, rank pattern, state dict as saved)."""
    peft = pytest.importorskip("peft")
    base, tokenizer = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
    config = dpeft.get_peft_config({**cfg.peft, "task_type": "CAUSAL_LM", "total_step": cfg.train.steps})
    torch.manual_seed(cfg.train.seed)  # as the loop seeds before get_peft_model: the same initial tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft_config_of(config))
    splits = load_splits(cfg.data, cfg.model.task, tokenizer, cfg.train.seed)
    order = GlobalOrder(len(splits.train), cfg.train.seed)
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    model.train()
    losses = []
    for step in range(cfg.train.steps):
        batch = collate([splits.train[i] for i in order.take(cfg.train.global_batch_size)], tokenizer.pad_id)
        loss = model(**batch).loss  # PEFT adds the orthogonal regulariser to it
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    pattern = {k.replace(".default", ""): v for k, v in model.peft_config["default"].rank_pattern.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = peft.get_peft_model_state_dict(model)
    return losses, pattern, state


def test_loop_equals_a_hand_written_peft_loop(full):
    cfg = load_run_config(TINY, _overrides("unused"))
    losses, pattern, state = _peft_reference(cfg)
    for step, (a, b) in enumerate(zip(full.losses, losses)):
        assert abs(a - b) < 5e-6, f"step {step}: loop loss {a} vs PEFT {b}"
    our_pattern, ours = _saved(full.adapter_dir)
    assert our_pattern == pattern
    assert sum(map(sum, pattern.values())) == 2 * len(pattern)  # the final budget: target_r per layer on average
    _assert_adapters_close(ours, state, 1e-5)


def test_resume_mid_schedule_equals_the_uninterrupted_run(full, tmp_path):
    # The last checkpoint exports (rank pattern from the checkpoint, pruned triplets dropped) to the final adapter.
    export_checkpoint(full.checkpoints[-1], str(tmp_path / "exported"))
    exported, final = _saved(str(tmp_path / "exported")), _saved(full.adapter_dir)
    assert exported[0] == final[0]
    _assert_adapters_close(exported[1], final[1], 0.0)

    mid = full.checkpoints[0]
    with open(os.path.join(mid, "dpeft.json")) as f:
        manifest = json.load(f)
    assert manifest["extra"]["step"] == MID and manifest["adapters"]["default"]["rank_pattern"]  # already masking
    assert any(k.endswith("/exp_avg_ipt") for k in manifest["hooks"])
    resumed = run(TINY, _overrides(str(tmp_path / "resumed"), f"checkpoint.resume={mid}"))
    assert resumed.resumed_from == mid and resumed.first_step == MID
    assert resumed.losses == pytest.approx(full.losses[MID:], abs=1e-6, rel=0)
    (pattern, ours), (want_pattern, want) = _saved(resumed.adapter_dir), _saved(full.adapter_dir)
    assert pattern == want_pattern
    _assert_adapters_close(ours, want, 1e-6)

    # The same checkpoint without the allocator's averages (as written before they were saved): the run diverges,
    # so the match above depends on them.
    stale = str(tmp_path / "stale" / os.path.basename(mid))
    shutil.copytree(mid, stale)
    manifest.pop("hooks")
    with open(os.path.join(stale, "dpeft.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.warns(UserWarning, match="holds no training state"):
        diverged = run(TINY, _overrides(str(tmp_path / "stale_run"), f"checkpoint.resume={stale}"))
    assert _saved(diverged.adapter_dir)[0] != want_pattern
    assert max(abs(a - b) for a, b in zip(diverged.losses, full.losses[MID:])) > 1e-5


def _trained_model(steps: int):
    """A dpeft AdaLoRA model after `steps` steps of PEFT's documented loop, and its optimizer."""
    torch.manual_seed(0)
    config = dpeft.AdaLoraConfig(
        target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8
    )
    model = dpeft.get_peft_model(build("llama")[0], config)
    optimizer = torch.optim.AdamW(model.store.optimizer_parameters(), lr=0.01)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    return model, optimizer


def test_checkpoint_restores_the_allocator_state_and_rank_pattern(tmp_path):
    trained, optimizer = _trained_model(4)
    path = save_checkpoint(str(tmp_path), 4, trained, optimizer, {"step": 4})
    fresh, fresh_opt = _trained_model(0)
    assert fresh.peft_config["default"].rank_pattern is None
    load_checkpoint(path, fresh, fresh_opt)
    assert fresh.peft_config["default"].rank_pattern == trained.peft_config["default"].rank_pattern
    want, got = trained.base_model.rankallocator, fresh.base_model.rankallocator
    assert sorted(got.exp_avg_ipt) == sorted(want.exp_avg_ipt) and want.exp_avg_ipt
    for table in ("exp_avg_ipt", "exp_avg_unc"):
        for key, value in getattr(want, table).items():
            assert value.abs().sum() > 0
            torch.testing.assert_close(getattr(got, table)[key], value, atol=0, rtol=0)


def test_checkpoint_without_matching_training_state_is_refused(tmp_path):
    trained, optimizer = _trained_model(2)
    path = save_checkpoint(str(tmp_path), 2, trained, optimizer, {"step": 2})
    manifest_file = os.path.join(path, "dpeft.json")
    with open(manifest_file) as f:
        manifest = json.load(f)
    manifest["hooks"] = {k: v for k, v in manifest["hooks"].items() if "q_proj" not in k}
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    fresh, fresh_opt = _trained_model(0)
    before = {k: v.clone() for k, v in fresh.store.state_dict("default").items()}
    with pytest.raises(ValueError, match="other training state than the model keeps"):
        load_checkpoint(path, fresh, fresh_opt)
    assert all(torch.equal(before[k], v) for k, v in fresh.store.state_dict("default").items())
    assert fresh.peft_config["default"].rank_pattern is None


def test_total_step_comes_from_the_run_and_deepspeed_is_refused(tmp_path):
    from dpeft.dist import DistInfo
    from dpeft.train.setup import _with_run_defaults, build_peft_model

    assert _with_run_defaults({"peft_type": "ADALORA"}, 30)["total_step"] == 30
    assert _with_run_defaults({"peft_type": "ADALORA", "total_step": 12}, 30)["total_step"] == 12
    assert "total_step" not in _with_run_defaults({"peft_type": "LORA"}, 30)
    cfg = load_run_config(TINY, _overrides(str(tmp_path)))
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), group=None)
    model, _ = build_model(cfg.model, cfg.data.max_length, 0)
    with pytest.raises(ValueError, match="deepspeed backend cannot run.*sharded or fsdp2"):
        build_peft_model(model, cfg, "deepspeed", info)


def test_hooks_the_loop_cannot_run_are_refused_not_skipped():
    """A method exporting per-step calls without `after_optimizer_step` is refused: never trained without them."""
    from dpeft.methods.hooks import ModelHooks
    from dpeft.train.setup import _check_model_hooks

    class StepHooks(ModelHooks):
        exports = ("step_me",)

        def step_me(self) -> None:
            """A per-step call the loop does not know."""

    model, _ = _trained_model(0)
    _check_model_hooks(model)  # AdaLoRA's hooks run in the loop
    assert model.base_model.model_hooks["default"].trains_in_loop
    model.base_model.model_hooks["default"] = StepHooks(model.base_model, "default", model.peft_config["default"])
    with pytest.raises(ValueError, match=r"per-step \['step_me'\]\) that dpeft.train.run does not run"):
        _check_model_hooks(model)


BACKENDS = ("sharded", "fsdp2", "local")  # local at W=2: replicated tensors, all-reduced gradients


def _two_ranks(root: str) -> dict[str, tuple[list[float], list[str]]]:
    out = {}
    for backend in BACKENDS:
        over = _overrides(os.path.join(root, backend), f"store.backend={backend}", f"checkpoint.every={MID}")
        result = run(TINY, over)
        out[backend] = (result.losses, result.checkpoints)
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_equal_one_process_and_reshard_to_one(full, tmp_path):
    runs = run_distributed(_two_ranks, 2, str(tmp_path), timeout=900)[0]
    want_pattern, want = _saved(full.adapter_dir)
    for backend, (losses, checkpoints) in runs.items():
        assert losses == pytest.approx(full.losses, abs=2e-5, rel=0), backend
        pattern, ours = _saved(str(tmp_path / backend / "adapter"))
        assert pattern == want_pattern, backend
        _assert_adapters_close(ours, want, 2e-4)
        # The W=2 mid-schedule checkpoint (averages saved as shards) resumed in one process.
        resumed = run(TINY, _overrides(str(tmp_path / f"{backend}-w1"), f"checkpoint.resume={checkpoints[0]}"))
        assert resumed.losses == pytest.approx(full.losses[MID:], abs=2e-5, rel=0), backend
        pattern, ours = _saved(resumed.adapter_dir)
        assert pattern == want_pattern, backend
        _assert_adapters_close(ours, want, 2e-4)


def test_grad_accumulation_adds_the_regulariser_once_per_step(full, tmp_path):
    accum = run(TINY, _overrides(str(tmp_path / "accum"), "train.grad_accum_steps=2"))
    assert accum.losses == pytest.approx(full.losses, abs=1e-5, rel=0)
    assert _saved(accum.adapter_dir)[0] == _saved(full.adapter_dir)[0]


def test_inference_mode_model_loads_a_training_checkpoint(full):
    """An adapter that keeps no allocator (inference mode) loads the tensors and ignores the saved averages."""
    cfg = load_run_config(TINY, _overrides("unused"))
    base, _ = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
    peft = {**cfg.peft, "task_type": "CAUSAL_LM", "total_step": STEPS, "inference_mode": True}
    model = dpeft.get_peft_model(base, dpeft.get_peft_config(peft))
    assert model.base_model.model_hooks["default"].rankallocator is None
    load_checkpoint(full.checkpoints[-1], model)
    assert model.peft_config["default"].rank_pattern == _saved(full.adapter_dir)[0]
    base, _ = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
    saved = dpeft.PeftModel.from_pretrained(base, full.adapter_dir)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, saved(input_ids=ids).logits, atol=1e-5, rtol=0)
