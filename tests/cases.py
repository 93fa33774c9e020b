"""The cross-method case table: every method x layer type runs through the common checks in test_common.py.

A row is (id, model name from tests/models.py, config factory, flags). Adding a method adds rows here; nothing
else in the common tests changes. `init_lora_weights=False`-style settings make adapters non-zero at init, so
"forward changes outputs" is meaningful without training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import dpeft


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    config: Callable[[], dpeft.PeftConfig]
    mergeable: bool = True
    mixed_batch: bool = True
    peft_interop: bool = True
    tags: tuple[str, ...] = field(default_factory=tuple)


def lora(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_lora_weights", False)
    return lambda: dpeft.LoraConfig(**kw)


CASES: list[Case] = [
    Case("lora-linear", "mlp", lora(target_modules=["lin0", "lin1"])),
    Case("lora-linear-regex", "mlp", lora(target_modules=r"lin[01]")),
    Case("lora-rslora", "mlp", lora(target_modules=["lin0", "lin1"], use_rslora=True, r=4, lora_alpha=16)),
    Case("lora-dropout", "mlp", lora(target_modules=["lin0"], lora_dropout=0.1)),
    Case("lora-bias-all", "mlp", lora(target_modules=["lin0"], bias="all")),
    Case("lora-bias-lora-only", "mlp", lora(target_modules=["lin0"], bias="lora_only")),
    Case("lora-lora-bias", "mlp", lora(target_modules=["lin0", "lin1"], lora_bias=True)),
    Case("lora-modules-to-save", "mlp", lora(target_modules=["lin0"], modules_to_save=["lin2"])),
    Case("lora-patterns", "mlp", lora(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2}, alpha_pattern={"lin0": 32})),
    Case("lora-embedding", "emb_conv1d", lora(target_modules=["emb"])),
    Case("lora-conv1d-transformers", "emb_conv1d", lora(target_modules=["conv1d"])),
    Case("lora-conv1d", "conv1d", lora(target_modules=["conv1d"])),
    Case("lora-conv2d", "conv2d", lora(target_modules=["conv2d", "conv2d_1x1"])),
    Case("dora-linear", "mlp", lora(target_modules=["lin0", "lin1"], use_dora=True)),
    Case("dora-embedding", "emb_conv1d", lora(target_modules=["emb"], use_dora=True)),
    Case("dora-conv1d-transformers", "emb_conv1d", lora(target_modules=["conv1d"], use_dora=True)),
    Case("dora-conv1d", "conv1d", lora(target_modules=["conv1d"], use_dora=True)),
    Case("dora-conv2d", "conv2d", lora(target_modules=["conv2d", "conv2d_1x1"], use_dora=True)),
    Case("lora-llama-all-linear", "llama", lora(target_modules="all-linear", task_type="CAUSAL_LM")),
    Case("lora-llama-default-targets", "llama", lora(task_type="CAUSAL_LM")),
    Case("dora-llama", "llama", lora(target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")),
    Case("lora-bert-seqcls", "bert", lora(target_modules=["query", "value"], task_type="SEQ_CLS")),
    Case("lora-gpt2", "gpt2", lora(target_modules=["c_attn"], task_type="CAUSAL_LM")),
]
