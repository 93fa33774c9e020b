"""`dpeft.ray.train`: Ray Train workers run the same `dpeft.train.run` as torchrun ranks.

Runs of one config (tiny Llama, LoRA, sharded store, 12 steps, a checkpoint every 4), shared by the tests through
module fixtures: the torchrun-style run on 2 spawned gloo ranks and a Ray run with 2 workers (default suite), and
(`-m slow`) a Ray run with 2 workers in which rank 1 SIGKILLs itself after step 6, with `max_failures=1`. The Ray
runs use the session's local cluster through `address=`. The Ray run must equal the torchrun run step for step
(same process-group backend, same arithmetic); the killed run must resume from the step-4 checkpoint and end with
the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file
from test_train_dist import _overrides as dist_overrides

from dpeft.train import run

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
STEPS, EVERY, KILL_AFTER = 12, 4, 6
KILL_ENV = "DPEFT_TEST_KILL_MARKER"
# Same backend, same ranks, same order of float operations: Ray and torchrun should agree to the last bit; the
# tolerance only leaves room for a gloo reduction order we do not control.
ATOL = 1e-6


def _overrides(out_dir: str) -> list[str]:
    """test_train_dist.py's LoRA case (tiny Llama, sharded store), shorter and with checkpoints."""
    return [*dist_overrides(out_dir, "sharded", False), f"train.steps={STEPS}", f"checkpoint.every={EVERY}"]


def _torchrun_rank(out_dir: str) -> list[float]:
    return run(TINY, _overrides(out_dir)).losses


def _kill_rank1_once(metrics: dict, checkpoint_dir: str | None) -> None:
    """on_report hook: rank 1 dies by SIGKILL after step KILL_AFTER, once (the marker comes through runtime_env)."""
    marker = os.environ[KILL_ENV]
    if metrics.get("step") == KILL_AFTER and os.environ["RANK"] == "1" and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def _records(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _train_losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if "lr" in r]  # training steps, not validation


def _adapter(out_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """The torchrun-style run and the uninterrupted Ray run: output dirs, torchrun losses, Ray's result."""
    import dpeft.ray

    root = str(tmp_path_factory.mktemp("ray_train"))
    dirs = {k: os.path.join(root, k) for k in ("torchrun", "ray", "killed")}
    torchrun_losses = run_distributed(_torchrun_rank, 2, dirs["torchrun"], timeout=600)[0]
    result = dpeft.ray.train(TINY, _overrides(dirs["ray"]), num_workers=2, address=ray_cluster)
    return dirs, torchrun_losses, result


@pytest.fixture(scope="module")
def killed(runs, ray_cluster):
    """The Ray run in which rank 1 dies after step KILL_AFTER; its result."""
    import dpeft.ray

    dirs = runs[0]
    # The hook must reach the workers, which cannot import this test module: send it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = os.path.join(os.path.dirname(dirs["killed"]), "killed-once")
    result = dpeft.ray.train(
        TINY,
        _overrides(dirs["killed"]),
        num_workers=2,
        address=ray_cluster,
        max_failures=1,
        runtime_env={"env_vars": {KILL_ENV: marker}},
        on_report=_kill_rank1_once,
    )
    assert os.path.exists(marker), "the kill hook never ran: runtime_env or on_report did not reach the workers"
    return result


def test_ray_matches_torchrun(runs):
    dirs, torchrun_losses, result = runs
    ray_losses = _train_losses(_records(dirs["ray"]))
    assert [s for s, _ in ray_losses] == list(range(1, STEPS + 1))
    assert len(torchrun_losses) == STEPS and torchrun_losses[-1] < torchrun_losses[0] - 0.1
    diff = max(abs(a - b) for (_, a), b in zip(ray_losses, torchrun_losses))
    assert diff <= ATOL, f"Ray vs torchrun losses differ by {diff:.3g}"
    want, got = _adapter(dirs["torchrun"]), _adapter(dirs["ray"])
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    # Ray's result: the last checkpoint, reported with the last step's record and the closing record of metrics.jsonl.
    last, end = _records(dirs["ray"])[-3], _records(dirs["ray"])[-1]
    assert (last["step"], end["event"]) == (STEPS, "end")
    assert result.metrics == {**last, **end}
    assert result.metrics["validation"]["loss"] == pytest.approx(_records(dirs["torchrun"])[-1]["validation"]["loss"])


def test_ray_checkpoint_is_a_complete_dpeft_checkpoint(runs, tmp_path):
    """Each worker uploaded only its own files; Ray's merged folder holds them all and exports the final adapter."""
    from dpeft.checkpoint.dcp import latest_checkpoint
    from dpeft.checkpoint.export import export_checkpoint

    dirs, _, result = runs
    path = result.checkpoint.path
    assert os.path.basename(path) == f"step-{STEPS:08d}"
    assert latest_checkpoint(os.path.dirname(path)) == path
    names = sorted(os.listdir(path))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "dpeft.json"} <= set(names), names
    assert sorted(os.listdir(os.path.join(path, "rng"))) == ["rank-00000.pt", "rank-00001.pt"]
    assert sorted(os.listdir(os.path.join(dirs["ray"], "checkpoints"))) == [f"step-{s:08d}" for s in (4, 8, 12)]
    export_checkpoint(path, str(tmp_path))
    exported = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    final = _adapter(dirs["ray"])
    assert sorted(exported) == sorted(final)
    for key, value in final.items():
        assert torch.equal(exported[key], value), key


@pytest.mark.slow
def test_killed_worker_resumes_from_latest_checkpoint(runs, killed):
    dirs, _, uninterrupted = runs
    steps = [s for s, _ in _train_losses(_records(dirs["killed"]))]
    # Steps 1..6 ran, rank 1 died, the new worker group resumed from step-4 and ran 5..12.
    assert steps == list(range(1, KILL_AFTER + 1)) + list(range(EVERY + 1, STEPS + 1))
    want = dict(_train_losses(_records(dirs["ray"])))
    for step, loss in _train_losses(_records(dirs["killed"])):
        assert loss == pytest.approx(want[step], abs=ATOL), f"step {step}"
    want, got = _adapter(dirs["ray"]), _adapter(dirs["killed"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert killed.metrics["validation"] == pytest.approx(uninterrupted.metrics["validation"], abs=ATOL)


def test_own_files_split_a_step_dir_between_ranks(tmp_path):
    """Every file of a step directory is uploaded by exactly one rank; rank 0 takes what no rank claims."""
    from dpeft.ray.train import own_files

    names = ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__2_1.distcp", ".metadata", "dpeft.json"]
    names += [f"rng/rank-{r:05d}.pt" for r in range(3)] + ["notes/other.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    split = {r: own_files(str(tmp_path), r) for r in range(3)}
    assert split[1] == ["__1_0.distcp", "rng/rank-00001.pt"]
    assert split[2] == ["__2_0.distcp", "__2_1.distcp", "rng/rank-00002.pt"]
    assert sorted(split[0]) == sorted(
        [".metadata", "__0_0.distcp", "dpeft.json", "notes/other.txt", "rng/rank-00000.pt"]
    )
    assert sorted(sum(split.values(), [])) == sorted(names)


@pytest.mark.parametrize(
    ("kwargs", "overrides", "message"),
    [
        ({"num_workers": 3}, [], "multiple of num_workers=3"),
        ({"num_workers": 0}, [], "num_workers must be an int >= 1"),
        ({}, ["train.device=cuda"], "pass use_gpu=True"),
        ({"max_failures": -2}, [], "max_failures must be"),
        ({}, ["checkpoint.resume=no/such/step-00000004"], "is not a checkpoint directory"),
    ],
)
def test_bad_arguments_fail_before_ray_starts(tmp_path, kwargs, overrides, message):
    import dpeft.ray

    was_connected = ray.is_initialized()
    with pytest.raises(ValueError, match=message):
        dpeft.ray.train(TINY, [f"output.dir={tmp_path}", *overrides], **kwargs)
    assert ray.is_initialized() == was_connected and not os.listdir(tmp_path)


def test_init_distributed_joins_an_existing_group_and_checks_its_backend(monkeypatch):
    """A group made before `run` (as Ray Train makes one) is joined as it is; one that cannot serve the device is
    refused."""
    import torch.distributed as dist
    from dist_utils import _free_port

    from dpeft.dist import init_distributed

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        info = init_distributed("cpu")
        assert (info.rank, info.world_size, info.group) == (0, 1, dist.group.WORLD)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        with pytest.raises(ValueError, match="uses 'nccl', which cannot run dpeft's collectives on cpu"):
            init_distributed("cpu")
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
        assert init_distributed("cpu").world_size == 1
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


@pytest.mark.slow
def test_resume_at_another_number_of_workers_reshards(runs, ray_cluster):
    """A 1-worker Ray run resumed from the 2-worker Ray run's step-8 checkpoint ends where the 2-worker run did.

    Tolerances as in test_train_dist.py (W=1 vs W=2 differ only in float summation order)."""
    import dpeft.ray

    dirs, _, uninterrupted = runs
    step8 = os.path.join(os.path.dirname(uninterrupted.checkpoint.path), f"step-{2 * EVERY:08d}")
    out = os.path.join(os.path.dirname(dirs["ray"]), "one-worker")
    dpeft.ray.train(TINY, [*_overrides(out), f"checkpoint.resume={step8}"], num_workers=1, address=ray_cluster)
    losses = _train_losses(_records(out))
    assert [s for s, _ in losses] == list(range(2 * EVERY + 1, STEPS + 1))
    want = dict(_train_losses(_records(dirs["ray"])))
    for step, loss in losses:
        assert loss == pytest.approx(want[step], abs=2e-5), f"step {step}"
    want, got = _adapter(dirs["ray"]), _adapter(out)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-4, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
