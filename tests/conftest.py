"""Shared helpers of the test suite: building a case's model, comparing outputs, and HF PEFT as an oracle.

HF PEFT is imported only here and in tests, never in `dpeft/`.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from cases import CASES, Case, perturb_trainable  # noqa: E402
from models import build, output  # noqa: E402

import dpeft  # noqa: E402

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Each test starts from the same RNG state, so adapter inits (and failures) reproduce."""
    torch.manual_seed(0)


def case_by_id(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def batched(kwargs: dict, n: int) -> dict:
    """Repeat the example inputs along the batch dimension to exactly `n` rows."""
    out = {}
    for key, value in kwargs.items():
        reps = -(-n // value.shape[0])
        out[key] = torch.cat([value] * reps)[:n]
    return out


def make_case(case: Case, seed: int = 0, adapter_seed: int = 0):
    """(peft model in eval mode, example inputs, base outputs before injection) for one case row."""
    base, kw = build(case.model, seed)
    with torch.no_grad():
        ref = output(base, kw)
    torch.manual_seed(adapter_seed)
    model = dpeft.get_peft_model(base, case.config()).eval()
    if case.perturb:  # an identity-at-init adapter (LN tuning): move it so that it changes outputs
        perturb_trainable(model, seed=1000 + adapter_seed)
    return model, kw, ref


@torch.no_grad()
def out(model, kw, **extra) -> torch.Tensor:
    return output(model, {**kw, **extra})


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, msg: str = "") -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{msg} max abs diff {diff:.3g} > {atol:.1g}"


def assert_differs(actual: torch.Tensor, expected: torch.Tensor, min_diff: float = 1e-5, msg: str = "") -> None:
    diff = (actual - expected).abs().max().item()
    assert diff > min_diff, f"{msg} outputs should differ but max abs diff is {diff:.3g}"


@torch.no_grad()
def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """`model` in eval mode with every trainable tensor moved off its init by seeded noise (so each one matters)."""
    g = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=g) * scale)
    return model.eval()


def peft_config_of(config: dpeft.PeftConfig):
    """The HF PEFT config with the same fields (through the JSON dict both libraries read and write)."""
    import peft

    data = config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_config(data)


def snapshot(model: torch.nn.Module) -> dict:
    """What a failed load must leave unchanged: module types, parameter names and values."""
    return {
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": sorted(n for n, _ in model.named_buffers()),
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["types"] == after["types"], "module structure changed"
    assert sorted(before["params"]) == sorted(after["params"]), "parameter names changed"
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), f"parameter {name} changed"
    assert before["buffers"] == after["buffers"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting one costs seconds); the address for `address=`."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
