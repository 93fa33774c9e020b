"""The cross-method case table: every method x layer type runs through the common checks in test_common.py.

A row is (id, model name from tests/models.py, config factory, flags). Adding a method adds rows here; nothing
else in the common tests changes. `init_lora_weights=False`-style settings make adapters non-zero at init, so
"forward changes outputs" is meaningful without training. A method with no such init (LN tuning starts as an exact
copy of the norms) sets `perturb=True`: the common checks then move every trainable adapter tensor off its init
with seeded noise right after the adapter is created (`perturb_trainable`), the same for every such row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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
    perturb: bool = False  # the adapter is the identity at init: add seeded noise to it after creation


@torch.no_grad()
def perturb_trainable(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add seeded noise to every trainable tensor of `model` (the active adapter's), visited in name order.

    Name order makes the noise depend only on the parameter names, so a dpeft and an HF PEFT model with the same
    trainable names (checked by test_common's trainable-parameter test) get the same values for the same seed.
    """
    g = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=g, dtype=torch.float32).to(param.dtype) * scale)


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


def vera(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)  # lambda_b = 1, lambda_d normal: the adapter changes outputs at init
    kw.setdefault("r", 8)
    return lambda: dpeft.VeraConfig(**kw)


CASES += [
    # lin0 (20x10) and lin1 (20x20): shared projections sized (8, 20) / (20, 8), sliced per layer.
    Case("vera-linear", "mlp", vera(target_modules=["lin0", "lin1"])),
    Case("vera-bias-only", "mlp", vera(target_modules=["lin0"], bias="vera_only", projection_prng_key=3)),
    Case("vera-modules-to-save", "mlp", vera(target_modules=["lin1"], modules_to_save=["lin2"])),
    Case("vera-conv1d-transformers", "emb_conv1d", vera(target_modules=["conv1d", "lin0"], r=2)),
    Case("vera-llama", "llama", vera(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
    Case("vera-gpt2", "gpt2", vera(target_modules=["c_attn", "mlp.c_proj"], task_type="CAUSAL_LM")),
]


def oft(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)
    return lambda: dpeft.OFTConfig(**kw)


CASES += [
    Case("oft-linear", "mlp", oft(target_modules=["lin0", "lin1"], oft_block_size=5)),
    Case(
        "oft-linear-r-exact-cayley",
        "mlp",
        oft(target_modules=["lin0", "lin1"], r=2, oft_block_size=0, use_cayley_neumann=False),
    ),
    Case("oft-block-share", "mlp", oft(target_modules=["lin0", "lin1"], oft_block_size=5, block_share=True)),
    Case(
        "oft-bias-oft-only",
        "mlp",
        oft(target_modules=["lin0"], oft_block_size=2, bias="oft_only", num_cayley_neumann_terms=3),
    ),
    Case("oft-modules-to-save", "mlp", oft(target_modules=["lin0"], oft_block_size=5, modules_to_save=["lin2"])),
    Case("oft-embedding", "emb_conv1d", oft(target_modules=["emb"], r=1, oft_block_size=0)),
    Case("oft-conv2d-1x1", "conv2d", oft(target_modules=["conv2d_1x1"], oft_block_size=5)),
    # Constrained OFT: every use first projects the stored blocks into the eps-ball (written back, as PEFT does).
    Case("oft-coft", "mlp", oft(target_modules=["lin0", "lin1"], oft_block_size=5, coft=True, eps=0.05)),
    Case("oft-coft-embedding", "emb_conv1d", oft(target_modules=["emb"], r=1, oft_block_size=0, coft=True, eps=0.1)),
    # PEFT 0.21.2's unmerged OFT forward on k>1 convolutions sums overlapping patches (not the identity at init);
    # dpeft uses the merged form W R^T, which tests/test_method_oft.py checks against PEFT's merged model.
    Case("oft-conv2d", "conv2d", oft(target_modules=["conv2d", "conv2d_1x1"], oft_block_size=5), peft_interop=False),
    Case(
        "oft-llama",
        "llama",
        oft(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8, task_type="CAUSAL_LM"),
    ),
]


def adalora(**kw) -> Callable[[], dpeft.PeftConfig]:
    # Random A, E, B (E = 0 at default init would be the identity); lora_alpha=1 keeps outputs O(1) for 1e-5 checks.
    kw = {"init_lora_weights": False, "total_step": 10, "init_r": 4, "target_r": 2, "lora_alpha": 1, **kw}
    return lambda: dpeft.AdaLoraConfig(**kw)


# AdaLoRA allows one trainable adapter (as PEFT): the common two-adapter checks add the second in inference mode.
ONE_TRAINABLE = ("one-trainable",)
CASES += [
    Case("adalora-linear", "mlp", adalora(target_modules=["lin0", "lin1"]), tags=ONE_TRAINABLE),
    Case(
        "adalora-dropout-bias",
        "mlp",
        adalora(target_modules=["lin0"], lora_dropout=0.1, bias="lora_only"),
        tags=ONE_TRAINABLE,
    ),
    Case(
        "adalora-modules-to-save",
        "mlp",
        adalora(target_modules=["lin1"], modules_to_save=["lin2"]),
        tags=ONE_TRAINABLE,
    ),
    Case("adalora-conv1d-transformers", "emb_conv1d", adalora(target_modules=["conv1d"]), tags=ONE_TRAINABLE),
    Case("adalora-conv2d", "conv2d", adalora(target_modules=["conv2d", "conv2d_1x1"]), tags=ONE_TRAINABLE),
    Case("adalora-llama", "llama", adalora(task_type="CAUSAL_LM"), tags=ONE_TRAINABLE),
    Case("adalora-gpt2", "gpt2", adalora(task_type="CAUSAL_LM", init_r=3), tags=ONE_TRAINABLE),
]


def vblora(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("r", 2)
    kw.setdefault("num_vectors", 8)
    kw.setdefault("init_vector_bank_bound", 0.5)  # PEFT's 0.02 barely moves these tiny models' outputs
    return lambda: dpeft.VBLoRAConfig(**kw)


CASES += [
    Case("vblora-linear", "mlp", vblora(target_modules=["lin0", "lin1"], vector_length=10)),
    Case(
        "vblora-topk3-bias-only", "mlp", vblora(target_modules=["lin1"], vector_length=5, topk=3, bias="vblora_only")
    ),
    Case("vblora-modules-to-save", "mlp", vblora(target_modules=["lin0"], vector_length=5, modules_to_save=["lin2"])),
    Case(
        "vblora-llama",
        "llama",
        vblora(target_modules=["q_proj", "v_proj", "down_proj"], vector_length=8, task_type="CAUSAL_LM"),
    ),
    Case("vblora-gpt2-conv1d", "gpt2", vblora(target_modules=["c_attn"], vector_length=16, task_type="CAUSAL_LM")),
]
# Saves top-k indices/weights instead of logits (a smaller, inference-only checkpoint), as PEFT does.
CASES += [
    Case(
        "vblora-save-only-topk",
        "mlp",
        vblora(target_modules=["lin0", "lin1"], vector_length=5, save_only_topk_weights=True),
    )
]


def boft(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)
    return lambda: dpeft.BOFTConfig(**kw)


CASES += [
    Case("boft-linear", "mlp", boft(target_modules=["lin0", "lin1"], boft_block_size=5)),
    Case(
        "boft-block-num-bias",
        "mlp",
        boft(target_modules=["lin0", "lin1"], boft_block_size=0, boft_block_num=2, bias="boft_only"),
    ),
    Case("boft-dropout", "mlp", boft(target_modules=["lin0", "lin1"], boft_block_size=2, boft_dropout=0.5)),
    Case("boft-modules-to-save", "mlp", boft(target_modules=["lin0"], boft_block_size=5, modules_to_save=["lin2"])),
    Case("boft-conv2d", "conv2d", boft(target_modules=["conv2d", "conv2d_1x1"], boft_block_size=5)),
    Case(
        "boft-llama",
        "llama",
        boft(target_modules=["q_proj", "v_proj", "down_proj"], boft_block_size=8, task_type="CAUSAL_LM"),
    ),
    # Butterfly factors > 1: HF PEFT builds them only with its CUDA extension (on CPU it silently uses one factor),
    # so these rows are checked against a hand-written reference in tests/test_method_boft.py instead of PEFT.
    Case(
        "boft-butterfly",
        "mlp",
        boft(target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=2),
        peft_interop=False,
    ),
    Case(
        "boft-butterfly-llama",
        "llama",
        boft(
            target_modules=["q_proj", "v_proj"],
            boft_block_num=4,
            boft_block_size=0,
            boft_n_butterfly_factor=3,
            task_type="CAUSAL_LM",
        ),
        peft_interop=False,
    ),
]


def hra(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)
    return lambda: dpeft.HRAConfig(**kw)


CASES += [
    Case("hra-linear", "mlp", hra(target_modules=["lin0", "lin1"], r=4)),
    Case("hra-gram-schmidt", "mlp", hra(target_modules=["lin0", "lin1"], r=3, apply_GS=True)),
    Case("hra-bias-hra-only", "mlp", hra(target_modules=["lin0"], r=2, bias="hra_only")),
    Case("hra-modules-to-save", "mlp", hra(target_modules=["lin0"], r=2, modules_to_save=["lin2"])),
    Case("hra-conv2d", "conv2d", hra(target_modules=["conv2d", "conv2d_1x1"], r=4)),
    Case("hra-conv2d-gram-schmidt", "conv2d", hra(target_modules=["conv2d", "conv2d_1x1"], r=5, apply_GS=True)),
    Case("hra-llama", "llama", hra(target_modules=["q_proj", "v_proj", "down_proj"], r=6, task_type="CAUSAL_LM")),
]


def randlora(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)  # lambda normal: the adapter changes outputs at init
    kw.setdefault("r", 4)
    kw.setdefault("randlora_alpha", kw["r"])  # PEFT's 640 (20 x its default r) blows up these tiny models
    return lambda: dpeft.RandLoraConfig(**kw)


CASES += [
    # PEFT saves the shared bases at model level AND under every layer: both directions must agree on those keys.
    Case("randlora-linear", "mlp", randlora(target_modules=["lin0", "lin1"])),
    Case("randlora-sparse-bias-only", "mlp", randlora(target_modules=["lin0"], sparse=True, bias="randlora_only")),
    Case(
        "randlora-very-sparse-mts",
        "mlp",
        randlora(target_modules=["lin1"], very_sparse=True, modules_to_save=["lin2"]),
    ),
    Case("randlora-conv1d-transformers", "emb_conv1d", randlora(target_modules=["conv1d", "lin0"], r=2)),
    Case(
        "randlora-llama",
        "llama",
        randlora(target_modules=["q_proj", "v_proj", "down_proj"], r=8, task_type="CAUSAL_LM"),
    ),
    Case("randlora-gpt2", "gpt2", randlora(target_modules=["c_attn", "mlp.c_proj"], r=8, task_type="CAUSAL_LM")),
]


def delora(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)
    return lambda: dpeft.DeloraConfig(**kw)


CASES += [
    Case("delora-linear", "mlp", delora(target_modules=["lin0", "lin1"], r=4)),
    Case(
        "delora-patterns",
        "mlp",
        delora(target_modules=["lin0", "lin1"], r=4, rank_pattern={"lin1": 2}, lambda_pattern={"lin0": 3}),
    ),
    Case("delora-dropout-bias", "mlp", delora(target_modules=["lin0"], r=2, module_dropout=0.2, bias="delora_only")),
    Case("delora-modules-to-save", "mlp", delora(target_modules=["lin0"], r=2, modules_to_save=["lin2"])),
    Case(
        "delora-llama", "llama", delora(target_modules=["q_proj", "v_proj", "down_proj"], r=6, task_type="CAUSAL_LM")
    ),
]


def c3a(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", "gaussian")  # PEFT's default xavier kernel barely moves these tiny models
    return lambda: dpeft.C3AConfig(**kw)


CASES += [
    Case("c3a-linear", "mlp", c3a(target_modules=["lin0", "lin1"], block_size=5)),
    Case(
        "c3a-xavier-bias-only", "mlp", c3a(target_modules=["lin1"], block_size=10, init_weights=False, bias="c3a_only")
    ),
    Case("c3a-modules-to-save", "mlp", c3a(target_modules=["lin0"], block_size=2, modules_to_save=["lin2"])),
    Case(
        "c3a-llama-pattern",
        "llama",
        c3a(
            target_modules=["q_proj", "v_proj", "down_proj"],
            block_size=8,
            block_size_pattern={"down_proj": 16},
            task_type="CAUSAL_LM",
        ),
    ),
]


def miss(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)  # random block (the "bat"/"mini" variants start at zero: test_method_miss)
    return lambda: dpeft.MissConfig(**kw)


CASES += [
    Case("miss-linear-remainder", "mlp", miss(target_modules=["lin0", "lin1"], r=3)),  # 10 % 3: a partial slice
    Case("miss-dropout-bias", "mlp", miss(target_modules=["lin0"], r=5, miss_dropout=0.1, bias="MiSS_only")),
    Case("miss-modules-to-save", "mlp", miss(target_modules=["lin1"], r=4, modules_to_save=["lin2"])),
    Case("miss-llama", "llama", miss(r=8, task_type="CAUSAL_LM")),
]


def shira(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)  # normal weights: the adapter changes outputs at init
    kw.setdefault("r", 2)
    return lambda: dpeft.ShiraConfig(**kw)


CASES += [
    # The mask's indices are saved with the adapter (PEFT keeps them outside its modules; so does dpeft's store).
    Case("shira-linear", "mlp", shira(target_modules=["lin0", "lin1"])),
    Case(
        "shira-seeded-modules-to-save", "mlp", shira(target_modules=["lin1"], random_seed=4, modules_to_save=["lin2"])
    ),
    Case("shira-llama", "llama", shira(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
]


def poly(**kw) -> Callable[[], dpeft.PeftConfig]:
    kw.setdefault("init_weights", False)  # random B: the adapter changes outputs at init
    kw.setdefault("n_tasks", 3)
    return lambda: dpeft.PolyConfig(**kw)


CASES += [
    # The models' inputs carry task_ids (one task per row); PEFT passes them to the layers only through its task
    # classes, hence FEATURE_EXTRACTION on the custom model. Not mergeable (the change depends on each row's task).
    Case(
        "poly-linear",
        "seq_mlp_tasks",
        poly(target_modules=["lin0", "lin1"], r=2, task_type="FEATURE_EXTRACTION"),
        mergeable=False,
    ),
    Case(
        "poly-mhr-modules-to-save",
        "seq_mlp_tasks",
        poly(
            target_modules=["lin0", "lin1"],
            n_splits=2,
            n_skills=3,
            modules_to_save=["lin2"],
            task_type="FEATURE_EXTRACTION",
        ),
        mergeable=False,
    ),
    Case("poly-llama", "llama_tasks", poly(r=4, n_skills=2, task_type="CAUSAL_LM"), mergeable=False),
    Case(
        "poly-llama-mhr",
        "llama_tasks",
        poly(target_modules=["q_proj", "down_proj"], n_splits=4, task_type="CAUSAL_LM"),
        mergeable=False,
    ),
]


# Prompt learning: virtual tokens in the inputs, no layer adapted. PEFT cannot merge prompts (nor route them per
# row), so these rows skip the merge and mixed-batch checks. Causal LMs (and decoders given a prompt half) output
# the virtual positions too, in front (as in PEFT); the common checks compare the real positions with the base's
# (`models.real_positions`).
PROMPT = {"mergeable": False, "mixed_batch": False, "tags": ("prompt-learning",)}


def prompt_tuning(**kw) -> Callable[[], dpeft.PeftConfig]:
    return lambda: dpeft.PromptTuningConfig(num_virtual_tokens=3, **kw)


def prefix_tuning(**kw) -> Callable[[], dpeft.PeftConfig]:
    return lambda: dpeft.PrefixTuningConfig(num_virtual_tokens=3, **kw)


def p_tuning(**kw) -> Callable[[], dpeft.PeftConfig]:
    return lambda: dpeft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, **kw)


def multitask_prompt_tuning(**kw) -> Callable[[], dpeft.PeftConfig]:
    return lambda: dpeft.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2, **kw)


CASES += [
    Case("prompt-tuning-llama", "llama", prompt_tuning(task_type="CAUSAL_LM"), **PROMPT),
    Case("prompt-tuning-bert-seqcls", "bert", prompt_tuning(task_type="SEQ_CLS"), **PROMPT),
    Case("prefix-tuning-llama", "llama", prefix_tuning(task_type="CAUSAL_LM"), **PROMPT),
    Case(
        "prefix-tuning-llama-projection",
        "llama",
        prefix_tuning(prefix_projection=True, encoder_hidden_size=12, task_type="CAUSAL_LM"),
        # The file holds the projected prefix (as PEFT's): it loads for inference only, a trainable load is refused.
        **{**PROMPT, "tags": ("prompt-learning", "inference-only-checkpoint")},
    ),
    Case("p-tuning-llama-mlp", "llama", p_tuning(task_type="CAUSAL_LM"), **PROMPT),
    Case(
        "p-tuning-llama-lstm",
        "llama",
        p_tuning(encoder_reparameterization_type="LSTM", task_type="CAUSAL_LM"),
        **PROMPT,
    ),
    Case("p-tuning-bert-seqcls", "bert", p_tuning(task_type="SEQ_CLS"), **PROMPT),
    # Encoder-decoder (SEQ_2_SEQ_LM): prompts in front of the encoder's inputs, prefixes in the decoder's cache.
    Case("prompt-tuning-t5", "t5", prompt_tuning(task_type="SEQ_2_SEQ_LM"), **PROMPT),
    Case("prefix-tuning-t5", "t5", prefix_tuning(task_type="SEQ_2_SEQ_LM"), **PROMPT),
    Case("p-tuning-t5", "t5", p_tuning(task_type="SEQ_2_SEQ_LM"), **PROMPT),
    # Multitask prompts have a decoder half, in front of the decoder's inputs (outputs carry its positions). PEFT
    # 0.21.2 crashes on decoder_input_ids here (it embeds the decoder inputs only when it makes them from labels);
    # tests/test_method_prompt.py checks this method on T5 against PEFT with labels instead.
    Case(
        "multitask-prompt-tuning-t5",
        "t5_tasks",
        multitask_prompt_tuning(task_type="SEQ_2_SEQ_LM"),
        peft_interop=False,
        **PROMPT,
    ),
    # One task index per row (tests/models.py `llama_tasks`): each row gets its task's prompt.
    Case("multitask-prompt-tuning-llama", "llama_tasks", multitask_prompt_tuning(task_type="CAUSAL_LM"), **PROMPT),
    Case(
        "multitask-prompt-tuning-bert-seqcls",
        "bert_tasks",
        multitask_prompt_tuning(num_ranks=2, task_type="SEQ_CLS"),
        **PROMPT,
    ),
]


# LN tuning: the adapter is a trainable copy of each targeted (norm) layer (the identity change at init, with no init
# option in PEFT to change that), hence `perturb=True`. Merging writes the copy into the norm (PEFT swaps the module).
def ln_tuning(**kw) -> Callable[[], dpeft.PeftConfig]:
    return lambda: dpeft.LNTuningConfig(**kw)


LN = {"perturb": True}
CASES += [
    Case("ln-tuning-llama-rmsnorm", "llama", ln_tuning(task_type="CAUSAL_LM"), **LN),  # PEFT's llama defaults
    Case(
        "ln-tuning-bert-layernorm-seqcls", "bert", ln_tuning(target_modules=["LayerNorm"], task_type="SEQ_CLS"), **LN
    ),
    Case("ln-tuning-gpt2", "gpt2", ln_tuning(target_modules=["ln_1", "ln_f"], task_type="CAUSAL_LM"), **LN),
    Case("ln-tuning-groupnorm", "conv2d_groupnorm", ln_tuning(target_modules=["norm"]), **LN),
    Case("ln-tuning-t5", "t5", ln_tuning(task_type="SEQ_2_SEQ_LM"), **LN),  # T5LayerNorm (RMS, no bias), defaults
    Case(
        "ln-tuning-gpt2-modules-to-save",
        "gpt2",
        ln_tuning(target_modules=["ln_2"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
        **LN,
    ),
    # As in PEFT, any plain layer can be tuned the same way (a copy of its parameters replaces them).
    Case("ln-tuning-linear", "mlp", ln_tuning(target_modules=["lin0"]), **LN),
    Case("ln-tuning-gpt2-conv1d-and-norm", "gpt2", ln_tuning(target_modules=["c_attn", "ln_1"]), **LN),
    Case("ln-tuning-conv2d", "conv2d", ln_tuning(target_modules=["conv2d"]), **LN),
    Case("ln-tuning-embedding", "emb_conv1d", ln_tuning(target_modules=["emb"]), **LN),
]

# Registered methods without a row, each with the reason and where the same checks run for it
# (tests/test_common.py's coverage test reads this).
NOT_IN_TABLE: dict[str, str] = {}
