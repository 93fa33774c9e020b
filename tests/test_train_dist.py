"""W=2 gloo ranks and one process train on the same global batches: same losses, same final adapter.

Tolerances, from float32 summation order being the only difference (per-rank loss sums, reduce-scatter or
all-reduce averaging): 2e-5 absolute on each of the 20 step losses (losses are near 5, so about 6 significant
digits), and 2e-4 absolute on adapter values of order 0.1 after 20 AdamW steps, because Adam's g / sqrt(v) turns
rounding differences of near-zero gradients into larger relative differences of the update.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file

from dpeft.train import run

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
LOSS_ATOL, ADAPTER_ATOL = 2e-5, 2e-4
STEPS = 20
# id -> (store backend at W=2, use_dora)
CASES = {
    "lora-sharded": ("sharded", False),
    "dora-sharded": ("sharded", True),
    "lora-local-allreduce": ("local", False),
}


def _overrides(out_dir: str, backend: str, dora: bool) -> list[str]:
    return [
        "train.threads=1",
        "train.progress_bar=false",
        f"train.steps={STEPS}",
        "train.global_batch_size=8",
        "data.limit=96",
        "data.validation_size=8",
        "data.max_length=24",
        "optim.lr=0.01",
        f"store.backend={backend}",
        f"peft.use_dora={str(dora).lower()}",
        f"output.dir={out_dir}",
    ]


def _train_all(root: str) -> dict[str, tuple[list[float], str, dict]]:
    """Every case on this rank, one after the other (one spawn of the ranks for all cases)."""
    out = {}
    for case, (backend, dora) in CASES.items():
        result = run(TINY, _overrides(os.path.join(root, "w2", case), backend, dora))
        out[case] = (result.losses, result.backend, result.metrics_after)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_dist"))
    threads = torch.get_num_threads()
    try:
        one = {
            case: run(TINY, _overrides(os.path.join(root, "w1", case), "local", dora))
            for case, (_, dora) in CASES.items()
        }
    finally:
        torch.set_num_threads(threads)
    two = run_distributed(_train_all, 2, root, timeout=400)
    return root, one, two


def _adapter(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(runs, case):
    root, one, two = runs
    backend, dora = CASES[case]
    losses, got_backend, metrics = two[0][case]
    assert got_backend == two[1][case][1] == backend
    assert two[1][case][0] == losses  # every rank reports the same global-batch loss
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1
    diff = max(abs(a - b) for a, b in zip(losses, one[case].losses))
    assert diff <= LOSS_ATOL, f"W=2 vs W=1 losses differ by {diff:.3g}"
    assert metrics["loss"] == pytest.approx(one[case].metrics_after["loss"], abs=LOSS_ATOL)
    want, got = _adapter(os.path.join(root, "w1", case)), _adapter(os.path.join(root, "w2", case))
    assert sorted(got) == sorted(want) and any("lora_magnitude" in k for k in want) == dora
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ADAPTER_ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
