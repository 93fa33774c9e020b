"""QLoRA through `dpeft.train.run`: the run-config switch quantizes the base, training lowers the loss, and two
ranks with the sharded store (quantized base replicated, adapter state sharded) give one process's losses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from dist_utils import run_distributed

import dpeft
from dpeft.config.run_config import load_run_config
from dpeft.train import run
from dpeft.train.models import build_model

pytest.importorskip("bitsandbytes")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
QLORA = [
    "train.progress_bar=false",
    "data.limit=64",
    "data.validation_size=8",
    "data.max_length=32",
    "train.global_batch_size=8",
    "optim.lr=0.02",
    "train.eval_metrics=[loss]",
    "model.load_in_4bit=true",
    "model.bnb_4bit_compute_dtype=float32",
    "train.device=cpu",
]


def test_run_config_switch_quantizes_the_base():
    import bitsandbytes as bnb

    cfg = load_run_config(TINY, [*QLORA, "model.bnb_4bit_quant_type=fp4"])
    model, _ = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "fp4"
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    cfg = load_run_config(TINY, ["model.load_in_8bit=true"])
    model, _ = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    with pytest.raises(ValueError, match="choose one"):
        build_model(load_run_config(TINY, ["model.load_in_8bit=true", "model.load_in_4bit=true"]).model, 32, 0)


def test_qlora_run_learns_and_saves_a_loadable_adapter(tmp_path):
    result = run(TINY, [*QLORA, "train.steps=10", f"output.dir={tmp_path}", "checkpoint.every=10"])
    assert result.losses[-1] < result.losses[0] - 0.3, result.losses
    with open(os.path.join(result.checkpoints[-1], "dpeft.json")) as f:
        quantization = json.load(f)["base_quantization"]
    assert quantization["bits"] == 4 and quantization["quant_type"] == "nf4" and quantization["double_quant"]
    assert result.metrics_after["loss"] < result.metrics_before["loss"] - 0.3
    cfg = load_run_config(TINY, QLORA)
    base, _ = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
    loaded = dpeft.PeftModel.from_pretrained(base, result.adapter_dir)
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def _qlora_losses(out_dir: str, backend: str) -> list[float]:
    return run(
        TINY,
        [*QLORA, "train.steps=4", f"store.backend={backend}", f"output.dir={out_dir}", "output.save_adapter=false"],
    ).losses


@pytest.mark.slow
@pytest.mark.dist
def test_qlora_two_ranks_sharded_equals_one_process(tmp_path):
    single = _qlora_losses(str(tmp_path / "w1"), "local")
    ranks = run_distributed(_qlora_losses, 2, str(tmp_path / "w2"), "sharded", timeout=300)
    print(f"QLoRA losses W=1 {single} W=2 sharded {ranks[0]}")
    assert ranks[0] == pytest.approx(ranks[1], abs=0)
    assert ranks[0] == pytest.approx(single, abs=1e-4), (ranks[0], single)
