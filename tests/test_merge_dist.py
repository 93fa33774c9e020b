"""The merge on several ranks (gloo, CPU) writes the same bytes as one process; a killed merge publishes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from dist_utils import run_distributed
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
        written = run_distributed(_merge, world, base, adapter, out)
        assert sum(written) == total and all(b > 0 for b in written), written  # every rank wrote its share
        files = _files(out)
        assert sorted(files) == sorted(reference)
        for name, data in reference.items():
            assert files[name] == data, f"{name} differs between 1 and {world} ranks"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


_KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from dpeft.checkpoint import hf_shards, merge_checkpoint

    write = hf_shards.ShardWriter.write

    def slow_write(self, name, tensor):  # slow the merge down so that the kill lands mid-write
        time.sleep(0.2)
        write(self, name, tensor)

    hf_shards.ShardWriter.write = slow_write
    merge_checkpoint(sys.argv[1], [sys.argv[2]], sys.argv[3], shard_size="20KB", progress=False)
    """
)


def test_killed_merge_publishes_nothing_and_a_rerun_succeeds(base_and_adapter, tmp_path) -> None:
    base, adapter = base_and_adapter
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, base, adapter, out], env=env)
    deadline = time.monotonic() + 60
    tmp = []
    while time.monotonic() < deadline and child.poll() is None:
        tmp = [n for n in os.listdir(tmp_path) if n.startswith("out.tmp-")]
        if tmp and [n for n in os.listdir(tmp_path / tmp[0]) if n.endswith(".safetensors")]:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the merge ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
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
