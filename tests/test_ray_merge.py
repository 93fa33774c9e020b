"""The merge as a Ray job (`dpeft.ray.merge`): its output shards split over 2 Ray workers, the same bytes as one
process; bad input is refused on the driver before any worker starts."""

from __future__ import annotations

import os

import pytest
import torch
from models import tiny_llama

import dpeft
from dpeft.checkpoint import merge_checkpoint

pytest.importorskip("ray")
pytestmark = pytest.mark.dist  # one Ray Train job, ~30 s on 2 cores (the session shares one Ray cluster)


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_two_ray_workers_write_the_files_of_one_process(ray_cluster, tmp_path) -> None:
    from dpeft.cli.main import main as cli_main
    from dpeft.ray.merge import merge

    base = str(tmp_path / "tiny-llama")
    tiny_llama().save_pretrained(base, max_shard_size="20KB")
    torch.manual_seed(3)
    config = dpeft.LoraConfig(target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    dpeft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "adapter"))
    adapter = str(tmp_path / "adapter")

    merge_checkpoint(base, [adapter], str(tmp_path / "one"), shard_size="20KB", progress=False)
    out = str(tmp_path / "ray")
    cli_main(
        ["merge", "--base", base, "--adapter", adapter, "--out", out, "--shard-size", "20KB", "--ray-workers", "2"]
    )
    reference, got = _files(str(tmp_path / "one")), _files(str(tmp_path / "ray"))
    assert len([n for n in reference if n.endswith(".safetensors")]) >= 4
    assert sorted(got) == sorted(reference)
    for name, data in reference.items():
        assert got[name] == data, f"{name} differs between one process and two Ray workers"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]

    with pytest.raises(ValueError, match="exists; pass overwrite=True"):  # checked on the driver: no worker starts
        merge(base, [adapter], str(tmp_path / "ray"), num_workers=2)
