"""The merge on several ranks (gloo, CPU) writes the same bytes as one process; a killed merge publishes nothing."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import time
import traceback

import pytest
import torch
from models import tiny_llama

import dpeft
from dpeft.checkpoint import merge_checkpoint

pytestmark = pytest.mark.dist
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("merge_dist")
    base = str(root / "tiny-llama")
    tiny_llama().save_pretrained(base, max_shard_size="20KB")
    torch.manual_seed(3)
    config = dpeft.LoraConfig(
        target_modules="all-linear", init_lora_weights=False, use_dora=True, task_type="CAUSAL_LM"
    )
    dpeft.get_peft_model(tiny_llama(), config).save_pretrained(str(root / "adapter"))
    return base, str(root / "adapter")


def _forked_rank(rank: int, world_size: int, port: int, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from dpeft.dist import destroy_distributed, init_distributed

    try:
        init_distributed("cpu", timeout_s=120)
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported by the parent with the rank named
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_forked(fn, world_size: int, *args, timeout: float = 120) -> list:
    """Run ``fn(*args)`` on `world_size` gloo ranks forked from this process (fn returns plain Python values).

    Forked ranks inherit the imported torch and transformers; spawned ones (`dist_utils.run_distributed`) spend
    most of their time importing them again on a busy machine.
    """
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        ctx.Process(target=_forked_rank, args=(r, world_size, port, fn, args, results)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out = {}
    try:
        while len(out) < world_size:
            rank, ok, value = results.get(timeout=timeout)
            assert ok, f"rank {rank} failed:\n{value}"
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]


def _merge(base: str, adapter: str, out: str) -> int:
    return merge_checkpoint(base, [adapter], out, shard_size="20KB", progress=False).rank_bytes


def _files(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def test_one_two_and_four_ranks_write_identical_files(base_and_adapter, tmp_path) -> None:
    base, adapter = base_and_adapter
    total = _merge(base, adapter, str(tmp_path / "w1"))
    reference = _files(str(tmp_path / "w1"))
    assert len([n for n in reference if n.endswith(".safetensors")]) >= 4
    for world in (2, 4):
        out = str(tmp_path / f"w{world}")
        written = run_forked(_merge, world, base, adapter, out)
        assert sum(written) == total and all(b > 0 for b in written), written  # every rank wrote its share
        files = _files(out)
        assert sorted(files) == sorted(reference)
        for name, data in reference.items():
            assert files[name] == data, f"{name} differs between 1 and {world} ranks"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def _slow_merge(base: str, adapter: str, out: str) -> None:
    """A merge slowed down (in this child only) so that the kill lands mid-write."""
    from dpeft.checkpoint import hf_shards

    write = hf_shards.ShardWriter.write

    def slow_write(self, name, tensor):
        time.sleep(0.2)
        write(self, name, tensor)

    hf_shards.ShardWriter.write = slow_write
    _merge(base, adapter, out)


def test_killed_merge_publishes_nothing_and_a_rerun_succeeds(base_and_adapter, tmp_path) -> None:
    base, adapter = base_and_adapter
    out = str(tmp_path / "out")
    child = mp.get_context("fork").Process(target=_slow_merge, args=(base, adapter, out))
    child.start()
    deadline = time.monotonic() + 60
    tmp = []
    while time.monotonic() < deadline and child.is_alive():
        tmp = [n for n in os.listdir(tmp_path) if n.startswith("out.tmp-")]
        if tmp and [n for n in os.listdir(tmp_path / tmp[0]) if n.endswith(".safetensors")]:
            break
        time.sleep(0.01)
    assert child.is_alive(), "the merge ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert not os.path.exists(out), "a killed merge must not leave the output folder"
    assert tmp and not os.path.exists(tmp_path / tmp[0] / "config.json")  # the leftover is visibly incomplete
    _merge(base, adapter, out)
    reference = str(tmp_path / "reference")
    _merge(base, adapter, reference)
    assert _files(out) == _files(reference)


@pytest.mark.slow
def test_torchrun_launch_script(base_and_adapter, tmp_path) -> None:
    base, adapter = base_and_adapter
    out = str(tmp_path / "out")
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    cmd = [
        os.path.join(REPO, "launch", "merge_torchrun.sh"),
        "--base",
        base,
        "--adapter",
        adapter,
        "--out",
        out,
        "--shard-size",
        "20KB",
        "--no-progress",
    ]
    subprocess.run(cmd, env=env, check=True, cwd=REPO, timeout=300)
    reference = str(tmp_path / "reference")
    _merge(base, adapter, reference)
    assert _files(out) == _files(reference)
