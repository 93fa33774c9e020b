"""W=2 gloo ranks and one process train on the same global batches: same losses, same final adapter.

Tolerance: 2e-5 absolute on each of the 20 step losses (about 5 significant digits of a loss near 5) and 2e-5 on
every adapter value. Only float summation order differs between the runs (reduce-scatter / all-reduce averaging
and per-rank loss sums), so anything above float32 rounding growth over 20 Adam steps is a bug.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from dist_utils import run_distributed
from dpeft.train import run

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
ATOL = 2e-5
STEPS = 20


def _overrides(out_dir: str, backend: str, dora: bool) -> list[str]:
    return ["train.threads=1", "train.progress_bar=false", f"train.steps={STEPS}", "train.global_batch_size=8",
            "data.limit=96", "data.validation_size=8", "data.max_length=24", "optim.lr=0.01",
            f"store.backend={backend}", f"peft.use_dora={str(dora).lower()}", f"output.dir={out_dir}"]


def _train(out_dir: str, backend: str, dora: bool) -> tuple[list[float], str, dict]:
    result = run(TINY, _overrides(out_dir, backend, dora))
    return result.losses, result.backend, result.metrics_after


def _adapter(out_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("backend,dora", [("sharded", False), ("sharded", True), ("local", False)],
                         ids=["lora-sharded", "dora-sharded", "lora-local-allreduce"])
def test_two_ranks_match_one_process(tmp_path, backend, dora):
    one = run(TINY, _overrides(str(tmp_path / "w1"), "local", dora))
    ranks = run_distributed(_train, 2, str(tmp_path / "w2"), backend, dora, timeout=300)
    assert [r[1] for r in ranks] == [backend, backend]
    losses = ranks[0][0]
    assert ranks[1][0] == losses  # every rank reports the same global-batch loss
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1
    diff = max(abs(a - b) for a, b in zip(losses, one.losses))
    assert diff <= ATOL, f"W=2 vs W=1 losses differ by {diff:.3g}"
    assert ranks[0][2]["loss"] == pytest.approx(one.metrics_after["loss"], abs=ATOL)
    want, got = _adapter(str(tmp_path / "w1")), _adapter(str(tmp_path / "w2"))
    assert sorted(got) == sorted(want) and any("lora_magnitude" in k for k in want) == dora
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
