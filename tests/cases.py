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
    Case(
        "lora-patterns",
        "mlp",
        lora(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2}, alpha_pattern={"lin0": 32}),
    ),
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
    # PEFT also saves the base weights of a targeted transformers embedding layer.
    Case("lora-llama-embedding", "llama", lora(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")),
]


def ia3(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_ia3_weights", False)
    return lambda: dpeft.IA3Config(**kw)


CASES += [
    Case("ia3-linear", "mlp", ia3(target_modules=["lin0", "lin1"], feedforward_modules=[])),
    Case("ia3-linear-feedforward", "mlp", ia3(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    Case("ia3-regex-feedforward", "mlp", ia3(target_modules=r"lin[01]", feedforward_modules=r"lin0")),
    Case("ia3-modules-to-save", "mlp", ia3(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin2"])),
    Case("ia3-conv1d-transformers", "emb_conv1d", ia3(target_modules=["conv1d"], feedforward_modules=[])),
    Case("ia3-conv1d-transformers-ff", "emb_conv1d", ia3(target_modules=["conv1d"], feedforward_modules=["conv1d"])),
    Case("ia3-conv2d", "conv2d", ia3(target_modules=["conv2d", "conv2d_1x1"], feedforward_modules=["conv2d_1x1"])),
    Case("ia3-llama-default-targets", "llama", ia3(task_type="CAUSAL_LM")),
    Case(
        "ia3-gpt2",
        "gpt2",
        ia3(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], task_type="CAUSAL_LM"),
    ),
]


def loha(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)
    return lambda: dpeft.LoHaConfig(**kw)


def lokr(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)
    return lambda: dpeft.LoKrConfig(**kw)


CASES += [
    Case("loha-linear", "mlp", loha(target_modules=["lin0", "lin1"])),
    Case(
        "loha-patterns",
        "mlp",
        loha(target_modules=["lin0", "lin1"], r=4, rank_pattern={"lin1": 2}, alpha_pattern={"lin0": 16}),
    ),
    Case("loha-modules-to-save", "mlp", loha(target_modules=["lin0"], modules_to_save=["lin2"])),
    Case("loha-conv1d", "conv1d", loha(target_modules=["conv1d"])),
    Case("loha-conv1d-effective", "conv1d", loha(target_modules=["conv1d"], use_effective_conv2d=True)),
    Case("loha-conv2d", "conv2d", loha(target_modules=["conv2d", "conv2d_1x1"])),
    Case("loha-conv2d-effective", "conv2d", loha(target_modules=["conv2d", "conv2d_1x1"], use_effective_conv2d=True)),
    Case("loha-llama", "llama", loha(target_modules=["q_proj", "v_proj"], r=4, task_type="CAUSAL_LM")),
    Case("lokr-linear", "mlp", lokr(target_modules=["lin0", "lin1"])),
    Case("lokr-decompose-both", "mlp", lokr(target_modules=["lin0", "lin1"], r=2, decompose_both=True)),
    Case("lokr-decompose-factor", "mlp", lokr(target_modules=["lin0", "lin1"], r=1, decompose_factor=2)),
    Case(
        "lokr-patterns",
        "mlp",
        lokr(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 1}, alpha_pattern={"lin0": 16}),
    ),
    Case("lokr-conv1d", "conv1d", lokr(target_modules=["conv1d"], r=1)),
    Case("lokr-conv1d-effective", "conv1d", lokr(target_modules=["conv1d"], r=1, use_effective_conv2d=True)),
    Case("lokr-conv2d", "conv2d", lokr(target_modules=["conv2d", "conv2d_1x1"])),
    Case(
        "lokr-conv2d-effective",
        "conv2d",
        lokr(target_modules=["conv2d", "conv2d_1x1"], r=1, use_effective_conv2d=True),
    ),
    Case("lokr-llama", "llama", lokr(target_modules=["q_proj", "v_proj", "down_proj"], r=2, task_type="CAUSAL_LM")),
]


def fourierft(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("n_frequency", 50)
    kw.setdefault("scaling", 10.0)  # PEFT's 150 makes these tiny models' outputs ~100: fp32 merge error > 1e-5
    return lambda: dpeft.FourierFTConfig(**kw)


CASES += [
    Case("fourierft-linear", "mlp", fourierft(target_modules=["lin0", "lin1"])),
    Case("fourierft-bias-only", "mlp", fourierft(target_modules=["lin0"], bias="fourier_only", scaling=5.0)),
    Case("fourierft-modules-to-save", "mlp", fourierft(target_modules=["lin0"], modules_to_save=["lin2"])),
    Case("fourierft-conv1d-transformers", "emb_conv1d", fourierft(target_modules=["conv1d"], n_frequency=4)),
    Case(
        "fourierft-llama-pattern",
        "llama",
        fourierft(
            target_modules=["q_proj", "v_proj"],
            random_loc_seed=3,
            n_frequency_pattern={"v_proj": 20},
            task_type="CAUSAL_LM",
        ),
    ),
    Case("fourierft-gpt2-default-targets", "gpt2", fourierft(task_type="CAUSAL_LM")),
]
