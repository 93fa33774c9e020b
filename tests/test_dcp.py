"""Distributed checkpoints: resharding (save at W=2, resume at W=1 and W=4), crash safety, bad input, export."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

from dist_utils import run_distributed  # noqa: E402
from models import build  # noqa: E402

import dpeft  # noqa: E402
from dpeft.checkpoint.dcp import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from dpeft.checkpoint.export import export_checkpoint  # noqa: E402
from dpeft.cli.main import main as cli_main  # noqa: E402
from dpeft.store.sharded import adapter_state_bytes  # noqa: E402

GLOBAL_BATCH = 4
RESUME_STEPS = 3
_BYTES: dict[str, int] = {}


def _config(r: int = 6, **kw) -> dpeft.LoraConfig:
    return dpeft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=r, task_type="CAUSAL_LM", **kw)


def _setup(config=None):
    """Same model and optimizer on every rank; sharded when the job has more than one rank."""
    import torch.distributed as dist

    base, _ = build("llama")
    torch.manual_seed(0)
    model = dpeft.get_peft_model(base, config or _config())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        model.store.shard()
    opt = torch.optim.AdamW(model.store.optimizer_parameters(), lr=1e-2)
    return model, opt


def _steps(model, opt, first: int, n: int) -> list[float]:
    """`n` AdamW steps on global batches (seeded by step); each rank takes its rows; returns global losses."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    losses = []
    for step in range(first, first + n):
        ids = torch.randint(0, 64, (GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(step))
        mine = ids.chunk(world)[rank]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        _BYTES.update(adapter_state_bytes(model.store, opt))  # grads still held: the step's peak
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _snapshot(model, opt) -> dict:
    """Full adapter tensors (gathered) and this rank's optimizer shards, for comparing runs."""
    keys = model.store.param_keys()
    optim = {keys[id(p)][0]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return {"adapter": {k: v.clone() for k, v in model.store.state_dict("default").items()}, "optim": optim}


def _save_then_continue(root: str, n: int) -> dict:
    model, opt = _setup()
    first = _steps(model, opt, 0, n)
    path = save_checkpoint(root, n, model, opt, {"step": n, "data_position": n * GLOBAL_BATCH})
    at_save = _snapshot(model, opt)
    more = _steps(model, opt, n, n)
    shapes = [shape for _, shape, _ in model.store.param_keys().values()]
    return {
        "first": first,
        "more": more,
        "path": path,
        "at_save": at_save,
        "final": _snapshot(model, opt),
        "bytes": dict(_BYTES),
        "shapes": shapes,
    }


def _resume_and_continue(root: str, n: int) -> dict:
    model, opt = _setup()
    path = latest_checkpoint(root)
    extra = load_checkpoint(path, model, opt)
    at_load = _snapshot(model, opt)
    more = _steps(model, opt, extra["step"], n)
    shapes = [shape for _, shape, _ in model.store.param_keys().values()]
    return {
        "extra": extra,
        "more": more,
        "at_load": at_load,
        "final": _snapshot(model, opt),
        "bytes": dict(_BYTES),
        "shapes": shapes,
    }


def _full_optim(per_rank: list[dict]) -> dict:
    """Reassemble full optimizer state from ranks' shards (dim-0 chunks in rank order)."""
    out = {}
    for key in per_rank[0]:
        out[key] = {}
        for name, value in per_rank[0][key].items():
            parts = [r[key][name] for r in per_rank]
            out[key][name] = value if value.dim() == 0 else torch.cat(parts)
    return out


def _assert_same_state(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key] - b[key]).abs().max().item() if a[key].numel() else 0.0
        assert diff <= atol, f"{key}: {diff}"


@pytest.fixture(scope="module")
def saved_w2(tmp_path_factory) -> tuple[str, list[dict]]:
    """A checkpoint saved at W=2 after 3 steps, and what both ranks saw before and after it."""
    root = str(tmp_path_factory.mktemp("w2") / "ckpt")
    return root, run_distributed(_save_then_continue, 2, root, RESUME_STEPS)


def _check_continuation(name: str, saved: list[dict], runs: list[dict]) -> None:
    """Loaded state equals saved state exactly, and the next steps follow the uninterrupted W=2 run."""
    ref, n = saved[0], RESUME_STEPS
    assert runs[0]["extra"] == {"step": n, "data_position": n * GLOBAL_BATCH}, name
    _assert_same_state(runs[0]["at_load"]["adapter"], ref["at_save"]["adapter"], 0.0)
    ref_optim = _full_optim([r["at_save"]["optim"] for r in saved])
    loaded = _full_optim([r["at_load"]["optim"] for r in runs])
    for key in ref_optim:
        _assert_same_state(loaded[key], ref_optim[key], 0.0)
    # identical continuation: same losses and the same adapter and optimizer state afterwards
    gap = max(abs(a - b) for a, b in zip(runs[0]["more"], ref["more"]))
    assert gap < 1e-5, (name, runs[0]["more"], ref["more"])
    _assert_same_state(runs[0]["final"]["adapter"], ref["final"]["adapter"], 1e-5)
    ref_final = _full_optim([r["final"]["optim"] for r in saved])
    final = _full_optim([r["final"]["optim"] for r in runs])
    for key in ref_final:
        _assert_same_state(final[key], ref_final[key], 1e-5)


def _check_bytes(world: int, runs: list[dict]) -> None:
    """Per-rank bytes of adapter params + grads + AdamW state: total/W plus the padding of uneven splits."""
    shapes = runs[0]["shapes"]
    padded = sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes) * 4 * 4  # 4 fp32 copies
    total = sum(math.prod(s) for s in shapes) * 4 * 4
    for r in runs:
        assert r["bytes"]["total"] <= 1.05 * padded + 64, (world, r["bytes"], padded)
    assert sum(r["bytes"]["total"] for r in runs) >= total  # nothing is missing


def test_reshard_w2_to_w1_and_export(saved_w2, tmp_path):
    root, saved = saved_w2
    ref = saved[0]
    assert os.path.basename(ref["path"]) == f"step-{RESUME_STEPS:08d}"
    manifest = json.load(open(os.path.join(ref["path"], "dpeft.json")))
    assert manifest["world_size"] == 2 and manifest["mesh"] == {"shape": [2], "dim_names": ["dp"]}
    w1 = _resume_and_continue(root, RESUME_STEPS)  # in this process: the plain local store, no process group
    _check_continuation("W=1", saved, [w1])
    _check_bytes(1, [w1])
    _check_bytes(2, saved)
    assert max(r["bytes"]["total"] for r in saved) < 0.6 * w1["bytes"]["total"]

    # export: PEFT format from the W=2 checkpoint loads in HF PEFT with the in-memory model's outputs
    out = str(tmp_path / "exported")
    cli_main(["export", root, out])  # the root resolves to its newest complete step
    _check_hf_peft_outputs(out, ref["at_save"]["adapter"])
    out2 = str(tmp_path / "exported-lib")
    export_checkpoint(ref["path"], out2)  # the library call on the step directory writes the same files
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(out2, name), "rb").read(), name


@pytest.mark.slow  # ~60 s more on 2 shared cores: four more ranks start
def test_reshard_w2_to_w4(saved_w2):
    root, saved = saved_w2
    w4 = run_distributed(_resume_and_continue, 4, root, RESUME_STEPS)
    _check_continuation("W=4", saved, w4)  # r=6 over 4 ranks: rows 2/2/2/0, so rank 3 holds empty lora_A shards
    _check_bytes(4, w4)


def _check_hf_peft_outputs(adapter_dir: str, state: dict) -> None:
    import peft

    base, kw = build("llama")
    torch.manual_seed(0)
    ours = dpeft.get_peft_model(base, _config()).eval()
    ours.store.load_state_dict("default", state)
    with torch.no_grad():
        expected = ours(**kw).logits
    hf = peft.PeftModel.from_pretrained(build("llama")[0], adapter_dir).eval()
    with torch.no_grad():
        got = hf(**kw).logits
    assert (got - expected).abs().max().item() < 1e-5
    with torch.no_grad(), ours.disable_adapter():
        assert (ours(**kw).logits - expected).abs().max().item() > 1e-4  # the adapter matters


def _local_checkpoint(tmp_path, steps=(1,)):
    model, opt = _setup()
    root = str(tmp_path / "ckpt")
    for step in steps:
        _steps(model, opt, step - 1, 1)
        save_checkpoint(root, step, model, opt, {"step": step})
    return root, model, opt


def test_bad_checkpoints_are_clear_errors_and_change_nothing(tmp_path):
    root, model, opt = _local_checkpoint(tmp_path, steps=(1, 2, 3))
    assert latest_checkpoint(root).endswith("step-00000003")
    fresh, fresh_opt = _setup()
    before = {k: v.clone() for k, v in fresh.store.state_dict("default").items()}

    other_base, _ = build("llama", seed=5)  # another base model
    other = dpeft.get_peft_model(other_base, _config())
    with pytest.raises(ValueError, match="different base model"):
        load_checkpoint(latest_checkpoint(root), other)
    other_cfg, _ = _setup(_config(r=4))  # another adapter config
    with pytest.raises(ValueError, match=r"another config \(r: saved 6 != model 4\)"):
        load_checkpoint(latest_checkpoint(root), other_cfg)

    path = latest_checkpoint(root)
    shard = next(f for f in os.listdir(path) if f.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(ValueError, match=f"corrupted: {shard} \\(checksum mismatch\\)"):
        load_checkpoint(path, fresh, fresh_opt)
    with pytest.raises(ValueError, match="not a complete dpeft checkpoint"):
        load_checkpoint(str(tmp_path), fresh)
    for key, value in fresh.store.state_dict("default").items():
        assert torch.equal(value, before[key]), key
    assert not fresh_opt.state

    # retention: keep_last=2 removes the oldest complete checkpoint
    save_checkpoint(root, 4, model, opt, {"step": 4}, keep_last=2)
    assert sorted(os.listdir(root)) == ["step-00000003", "step-00000004"]


def _killed_save(root: str, marker: str) -> None:
    """Save step 1, then stall a save of step 2 after its shards are written (the parent SIGKILLs us there)."""
    from dpeft.checkpoint import dcp

    model, opt = _setup()
    _steps(model, opt, 0, 1)
    dcp.save_checkpoint(root, 1, model, opt, {"step": 1})
    _steps(model, opt, 1, 1)

    def stall(directory, manifest):  # the manifest and the rename never happen
        open(marker, "w").close()
        time.sleep(120)

    dcp.write_manifest = stall
    dcp.save_checkpoint(root, 2, model, opt, {"step": 2})


def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path):
    root, marker = str(tmp_path / "ckpt"), str(tmp_path / "marker")
    # spawn, not fork: a fork after torch ran its thread pools here can hang in the child
    proc = mp.get_context("spawn").Process(target=_killed_save, args=(root, marker))
    proc.start()
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker):
            assert proc.is_alive(), "the saving process died before reaching the stall"
            assert time.time() < deadline, "timed out waiting for the save to start"
            time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL, also when a check above failed
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert os.path.isdir(os.path.join(root, ".tmp-step-00000002"))  # the half-written save is there...
    assert latest_checkpoint(root) == os.path.join(root, "step-00000001")  # ...and never picked
    model, opt = _setup()
    assert load_checkpoint(latest_checkpoint(root), model, opt) == {"step": 1}
    assert opt.state  # the optimizer state came back
    # a new save of the same step replaces the leftover temporary directory
    save_checkpoint(root, 2, model, opt, {"step": 2})
    assert sorted(os.listdir(root)) == ["step-00000001", "step-00000002"]


def test_dora_and_modules_to_save_round_trip(tmp_path):
    config = _config(r=4, use_dora=True, modules_to_save=["lm_head"])
    model, opt = _setup(config)
    _steps(model, opt, 0, 2)
    path = save_checkpoint(str(tmp_path), 2, model, opt, {"step": 2})
    fresh, fresh_opt = _setup(config)
    assert load_checkpoint(path, fresh, fresh_opt) == {"step": 2}
    want, got = _snapshot(model, opt), _snapshot(fresh, fresh_opt)
    assert any("lm_head" in k for k in want["adapter"]) and any("magnitude" in k for k in want["adapter"])
    _assert_same_state(got["adapter"], want["adapter"], 0.0)
    for key in want["optim"]:
        _assert_same_state(got["optim"][key], want["optim"][key], 0.0)
    assert _steps(fresh, fresh_opt, 2, 1) == _steps(model, opt, 2, 1)
