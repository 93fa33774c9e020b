"""`dpeft.train.run` with the fsdp2 backend on 2 gloo ranks against one process, and checkpoints across backends.

Tolerances are those of tests/test_train_dist.py (float32 summation order is the only difference): 2e-5 on each
step's loss, 2e-4 on adapter values after AdamW steps. Slow (several training runs on 2 ranks): run with
``pytest -m slow tests/test_fsdp2_train.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file
from test_train_dist import _overrides as train_dist_overrides

from dpeft.train import run

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
LOSS_ATOL, ADAPTER_ATOL = 2e-5, 2e-4
STEPS, HALF = 8, 4


def _overrides(out_dir: str, backend: str, dora: bool, *extra: str) -> list[str]:
    """tests/test_train_dist.py's run, shortened (later overrides win)."""
    short = [f"train.steps={STEPS}", "train.eval_metrics=[loss]", "data.limit=64"]
    return [*train_dist_overrides(out_dir, backend, dora), *short, *extra]


def _train_w2(root: str) -> dict:
    """On each rank: LoRA and DoRA under fsdp2 (checkpointing at HALF), then resumes across backends."""
    out = {}
    for dora in (False, True):
        case = "dora" if dora else "lora"
        result = run(TINY, _overrides(os.path.join(root, "fsdp2", case), "fsdp2", dora, f"checkpoint.every={HALF}"))
        out[case] = (result.losses, result.backend)
    # sharded -> fsdp2 and fsdp2 -> sharded: run the first half under one backend, resume the second under the other
    first = run(TINY, _overrides(os.path.join(root, "sharded"), "sharded", False, f"checkpoint.every={HALF}"))
    for name, source, backend in [
        ("fsdp2_to_sharded", os.path.join(root, "fsdp2", "lora"), "sharded"),
        ("sharded_to_fsdp2", os.path.join(root, "sharded"), "fsdp2"),
    ]:
        resume = os.path.join(source, "checkpoints", f"step-{HALF:08d}")
        result = run(TINY, _overrides(os.path.join(root, name), backend, False, f"checkpoint.resume={resume}"))
        out[name] = (result.losses, result.backend, result.first_step)
    out["sharded"] = (first.losses, first.backend)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp2_train"))
    threads = torch.get_num_threads()
    try:
        one = {
            case: run(TINY, _overrides(os.path.join(root, "w1", case), "local", case == "dora"))
            for case in ("lora", "dora")
        }
    finally:
        torch.set_num_threads(threads)
    two = run_distributed(_train_w2, 2, root, timeout=600)
    return root, one, two


def _adapter(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))


def _close(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(a - b) for a, b in zip(got, want))


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_fsdp2_run_matches_one_process(runs, case):
    root, one, two = runs
    losses, backend = two[0][case]
    assert backend == two[1][case][1] == "fsdp2"
    assert two[1][case][0] == losses and losses[-1] < losses[0]
    assert _close(losses, one[case].losses) <= LOSS_ATOL
    want, got = _adapter(os.path.join(root, "w1", case)), _adapter(os.path.join(root, "fsdp2", case))
    assert sorted(got) == sorted(want) and any("lora_magnitude" in k for k in want) == (case == "dora")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ADAPTER_ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_exported_fsdp2_adapter_loads_in_peft(runs):
    """The adapter an fsdp2 run saved loads in HF PEFT and gives the outputs dpeft gives with it."""
    peft = pytest.importorskip("peft")
    import dpeft
    from dpeft.config.run_config import load_run_config
    from dpeft.train.models import build_model

    root, _, _ = runs
    cfg = load_run_config(TINY, _overrides(root, "local", False))
    path = os.path.join(root, "fsdp2", "lora", "adapter")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    outs = []
    for loader in (peft.PeftModel.from_pretrained, dpeft.PeftModel.from_pretrained):
        base, _ = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
        with torch.no_grad():
            outs.append(loader(base, path).eval()(input_ids=ids).logits)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["fsdp2_to_sharded", "sharded_to_fsdp2"])
def test_checkpoints_resume_across_backends(runs, name):
    """The second half resumed under the other backend gives the losses of the uninterrupted run."""
    _, one, two = runs
    losses, backend, first_step = two[0][name]
    assert first_step == HALF and backend == name.rsplit("_", 1)[-1]
    assert _close(losses, one["lora"].losses[HALF:]) <= LOSS_ATOL
    assert _close(two[0]["sharded"][0], one["lora"].losses) <= LOSS_ATOL


# Methods whose tensors FSDP2 does not find in one block: VB-LoRA's trainable vector bank (shared by every layer, owned
# by the root group) and prompt tuning's encoder (on the PeftModel, the root), trained by AdamW.
METHOD_PEFT = {
    "vblora": {
        "peft_type": "VBLORA",
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "vector_length": 8,
        "num_vectors": 16,
        "init_vector_bank_bound": 0.5,
    },
    "prompt_tuning": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"},
}


def _method_config(root: str, name: str) -> str:
    """tiny_llama.yaml with the adapter of METHOD_PEFT[name] (overrides merge into `peft`, so a new file)."""
    import yaml

    with open(TINY) as f:
        cfg = yaml.safe_load(f)
    cfg["peft"] = METHOD_PEFT[name]
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _method_w2(root: str) -> dict[str, tuple[list[float], str]]:
    out = {}
    for name in METHOD_PEFT:
        # A DCP checkpoint at HALF too: the root-owned DTensors and their AdamW state go through the same save.
        extra = f"checkpoint.every={HALF}"
        result = run(_method_config(root, name), _overrides(os.path.join(root, "fsdp2", name), "fsdp2", False, extra))
        out[name] = (result.losses, result.backend)
    return out


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp2_methods_train"))
    threads = torch.get_num_threads()
    try:
        one = {
            name: run(_method_config(root, name), _overrides(os.path.join(root, "w1", name), "local", False))
            for name in METHOD_PEFT
        }
    finally:
        torch.set_num_threads(threads)
    two = run_distributed(_method_w2, 2, root, timeout=600)
    return root, one, two


@pytest.mark.parametrize("name", list(METHOD_PEFT))
def test_fsdp2_run_matches_one_process_for_root_owned_tensors(method_runs, name):
    root, one, two = method_runs
    for losses, backend in (rank[name] for rank in two):
        assert backend == "fsdp2" and _close(losses, one[name].losses) <= LOSS_ATOL
    assert one[name].losses[-1] < one[name].losses[0]
    want, got = _adapter(os.path.join(root, "w1", name)), _adapter(os.path.join(root, "fsdp2", name))
    assert sorted(got) == sorted(want)
    assert os.path.isdir(os.path.join(root, "fsdp2", name, "checkpoints", f"step-{HALF:08d}"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ADAPTER_ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
