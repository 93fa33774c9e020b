"""Methods beyond LoRA against HF PEFT (the test-only oracle), beyond what the case table's common checks do:
initialisation semantics (same seed -> same tensors as PEFT), default init is the identity, per-model default
targets, PEFT's config rules, and that each method trains.

Checkpoint interop both ways and config round-trips for every method row of tests/cases.py run in
test_peft_interop.py; the common checks (save/load, merge, disable, two adapters, mixed batch) in test_common.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, out, peft_config_of
from models import build, output

import dpeft

peft = pytest.importorskip("peft")

# (id, model, config factory) with PEFT's DEFAULT init (the case table uses random init instead).
DEFAULT_INIT = [
    ("ia3", "mlp", lambda: dpeft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    ("ia3-conv2d", "conv2d", lambda: dpeft.IA3Config(target_modules=["conv2d"], feedforward_modules=[])),
    ("loha", "mlp", lambda: dpeft.LoHaConfig(target_modules=["lin0", "lin1"])),
    (
        "loha-conv2d-effective",
        "conv2d",
        lambda: dpeft.LoHaConfig(target_modules=["conv2d"], r=2, use_effective_conv2d=True),
    ),
    ("loha-conv1d", "conv1d", lambda: dpeft.LoHaConfig(target_modules=["conv1d"], r=2)),
    ("lokr", "mlp", lambda: dpeft.LoKrConfig(target_modules=["lin0", "lin1"])),
    ("lokr-lycoris-init", "mlp", lambda: dpeft.LoKrConfig(target_modules=["lin0", "lin1"], init_weights="lycoris")),
    (
        "lokr-decompose-both",
        "mlp",
        lambda: dpeft.LoKrConfig(target_modules=["lin0", "lin1"], r=1, decompose_both=True),
    ),
    (
        "lokr-conv2d-effective",
        "conv2d",
        lambda: dpeft.LoKrConfig(target_modules=["conv2d"], r=1, use_effective_conv2d=True),
    ),
    (
        "fourierft-zero-init",
        "mlp",
        lambda: dpeft.FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=30, init_weights=True),
    ),
    ("ln-tuning", "llama", lambda: dpeft.LNTuningConfig(task_type="CAUSAL_LM")),
    ("vera", "mlp", lambda: dpeft.VeraConfig(target_modules=["lin0", "lin1"], r=4)),
    ("vera-llama", "llama", lambda: dpeft.VeraConfig(r=8, projection_prng_key=5, task_type="CAUSAL_LM")),
    ("randlora", "mlp", lambda: dpeft.RandLoraConfig(target_modules=["lin0", "lin1"], r=4)),
    (
        "c3a-zero-init",
        "mlp",
        lambda: dpeft.C3AConfig(target_modules=["lin0", "lin1"], block_size=5, init_weights=True),
    ),
    ("shira", "mlp", lambda: dpeft.ShiraConfig(target_modules=["lin0", "lin1"], r=2, random_seed=1)),
]
RANDOM_INIT = [
    ("fourierft", "mlp", lambda: dpeft.FourierFTConfig(target_modules=["lin0", "lin1"], n_frequency=30)),
    (
        "ia3-random",
        "mlp",
        lambda: dpeft.IA3Config(target_modules=["lin0"], feedforward_modules=[], init_ia3_weights=False),
    ),
    (
        "loha-random",
        "conv2d",
        lambda: dpeft.LoHaConfig(target_modules=["conv2d"], init_weights=False, use_effective_conv2d=True),
    ),
    (
        "lokr-random",
        "mlp",
        lambda: dpeft.LoKrConfig(target_modules=["lin0", "lin1"], r=1, init_weights=False, decompose_both=True),
    ),
    ("vera-random", "mlp", lambda: dpeft.VeraConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False)),
    # PEFT re-draws the shared bank before each layer and keeps the last draw: the same seed must give that bank.
    (
        "vblora",
        "llama",
        lambda: dpeft.VBLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], vector_length=8, num_vectors=16),
    ),
    (
        "randlora-very-sparse-random",
        "llama",
        lambda: dpeft.RandLoraConfig(
            target_modules=["q_proj", "down_proj"], r=8, very_sparse=True, init_weights=False
        ),
    ),
    ("c3a-xavier-default", "llama", lambda: dpeft.C3AConfig(target_modules=["q_proj", "down_proj"], block_size=8)),
    (
        "c3a-kaiming",
        "mlp",
        lambda: dpeft.C3AConfig(target_modules=["lin0", "lin1"], block_size=10, init_weights="kaiming_uniform"),
    ),
]
# The orthogonal family (their own checks are in tests/test_method_<name>.py).
DEFAULT_INIT += [
    ("oft", "mlp", lambda: dpeft.OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=5)),
    ("oft-conv2d", "conv2d", lambda: dpeft.OFTConfig(target_modules=["conv2d"], oft_block_size=5)),
    ("boft", "mlp", lambda: dpeft.BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=5)),
    ("boft-conv2d", "conv2d", lambda: dpeft.BOFTConfig(target_modules=["conv2d", "conv2d_1x1"], boft_block_size=5)),
    ("delora", "llama", lambda: dpeft.DeloraConfig(r=4, lambda_pattern={"v_proj": 3}, task_type="CAUSAL_LM")),
]
RANDOM_INIT += [
    ("oft-random", "llama", lambda: dpeft.OFTConfig(oft_block_size=8, init_weights=False, task_type="CAUSAL_LM")),
    (
        "boft-random",
        "conv2d",
        lambda: dpeft.BOFTConfig(target_modules=["conv2d"], boft_block_size=5, init_weights=False),
    ),
    # HRA's default init is the identity only up to rounding (pairs of equal reflections), so it is listed here
    # (same tensors as PEFT) rather than in DEFAULT_INIT (exact identity); tests/test_method_hra.py checks it.
    ("hra-default-init", "conv2d", lambda: dpeft.HRAConfig(target_modules=["conv2d", "conv2d_1x1"], r=4)),
    ("hra-random", "mlp", lambda: dpeft.HRAConfig(target_modules=["lin0", "lin1"], r=3, init_weights=False)),
    ("delora-random", "mlp", lambda: dpeft.DeloraConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False)),
]
# AdaLoRA (the rank allocation and checkpoints after it: tests/test_method_adalora.py).
DEFAULT_INIT += [("adalora", "mlp", lambda: dpeft.AdaLoraConfig(target_modules=["lin0", "lin1"], total_step=10))]
RANDOM_INIT += [
    (
        "adalora-random",
        "conv2d",
        lambda: dpeft.AdaLoraConfig(target_modules=["conv2d"], init_r=3, total_step=10, init_lora_weights=False),
    )
]
# Prompt learning (tests/test_method_prompt.py has the rest): the saved prompt of the same seed equals PEFT's.
RANDOM_INIT += [
    (
        "prompt-tuning-vocab",
        "llama",
        lambda: dpeft.PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM"
        ),
    ),
    (
        "p-tuning-mlp",
        "llama",
        lambda: dpeft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8, task_type="CAUSAL_LM"),
    ),
    (
        "prefix-tuning-projection",
        "llama",
        lambda: dpeft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, task_type="CAUSAL_LM"),
    ),
]
# MiSS (its "bat"/"mini" checkpoints and merges on perturbed adapters: tests/test_method_miss.py).
DEFAULT_INIT += [
    ("miss", "mlp", lambda: dpeft.MissConfig(target_modules=["lin0", "lin1"], r=4)),
    ("miss-bat", "mlp", lambda: dpeft.MissConfig(target_modules=["lin0", "lin1"], r=5, init_weights="bat")),
    ("miss-mini", "llama", lambda: dpeft.MissConfig(r=8, init_weights="mini", mini_r=4, task_type="CAUSAL_LM")),
]
RANDOM_INIT += [("miss-random", "mlp", lambda: dpeft.MissConfig(target_modules=["lin0"], r=3, init_weights=False))]
# Poly (its math, routing, training parity and sharded run: tests/test_method_poly.py); inputs carry task_ids.
DEFAULT_INIT += [("poly", "llama_tasks", lambda: dpeft.PolyConfig(n_tasks=2, n_skills=3, task_type="CAUSAL_LM"))]
RANDOM_INIT += [
    (
        "poly-random-mhr",
        "seq_mlp_tasks",
        lambda: dpeft.PolyConfig(
            target_modules=["lin0", "lin1"], n_tasks=3, n_splits=2, init_weights=False, task_type="FEATURE_EXTRACTION"
        ),
    )
]
ALL = [pytest.param(m, f, id=i) for i, m, f in DEFAULT_INIT + RANDOM_INIT]


def _peft_model(model_name: str, config: dpeft.PeftConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(model_name)[0], peft_config_of(config))


@pytest.mark.parametrize(("model_name", "factory"), ALL)
def test_same_seed_gives_peft_tensors(model_name, factory):
    """Shapes, key names and init distributions follow PEFT so closely that the same seed gives the same tensors."""
    torch.manual_seed(11)
    ours = dpeft.get_peft_model(build(model_name)[0], factory())
    torch.manual_seed(11)
    theirs = _peft_model(model_name, factory())
    ours_sd, theirs_sd = dpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key, value in ours_sd.items():
        assert value.shape == theirs_sd[key].shape, key
        assert torch.equal(value, theirs_sd[key]), f"{key} differs from PEFT's init"


@pytest.mark.parametrize(("model_name", "factory"), [pytest.param(m, f, id=i) for i, m, f in DEFAULT_INIT])
def test_default_init_is_identity(model_name, factory):
    base, kw = build(model_name)
    reference = out(base, kw)
    model = dpeft.get_peft_model(base, factory())
    assert_close(out(model, kw), reference, atol=0)


TRAIN = (
    "ia3",
    "loha",
    "loha-conv2d-effective",
    "lokr",
    "lokr-lycoris-init",
    "fourierft-zero-init",
    "ln-tuning",
    "vera",
    "randlora",
    "c3a-zero-init",
    "shira",
)
TRAIN += ("oft", "boft", "delora")
TRAIN += ("adalora",)
TRAIN += ("miss", "miss-bat", "miss-mini")


@pytest.mark.parametrize(
    ("model_name", "factory"), [pytest.param(m, f, id=i) for i, m, f in DEFAULT_INIT if i in TRAIN]
)
def test_method_trains(model_name, factory):
    """A few Adam steps on a fixed batch lower the loss (the adapter gets gradients and they point downhill)."""
    torch.manual_seed(0)
    base, kw = build(model_name)
    model = dpeft.get_peft_model(base, factory()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    # A reachable target: the outputs of the same adapter moved away from its init (a "teacher").
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
        target = output(model, kw).detach()
        for p, s in zip(params, start):
            p.copy_(s)
    optimizer = torch.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = (output(model, kw) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss did not go down: {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_ia3_llama_defaults_match_peft():
    """With no target_modules / feedforward_modules, (IA)^3 uses PEFT's per-architecture table."""
    config = dpeft.IA3Config(task_type="CAUSAL_LM")
    model = dpeft.get_peft_model(build("llama")[0], config)
    saved = model.peft_config["default"]
    assert saved.target_modules == ["down_proj", "k_proj", "v_proj"] and saved.feedforward_modules == ["down_proj"]
    reference = _peft_model("llama", dpeft.IA3Config(task_type="CAUSAL_LM"))
    assert sorted(dpeft.get_peft_model_state_dict(model)) == sorted(peft.get_peft_model_state_dict(reference))
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert down.methods["default"].is_feedforward and down.entries["default"].params["ia3_l"].shape == (1, 64)


def test_ia3_config_rules():
    with pytest.raises(ValueError, match="subset of `target_modules`"):
        dpeft.IA3Config(target_modules=["lin0"], feedforward_modules=["lin1"])
    with pytest.raises(ValueError, match="feedforward_modules"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.IA3Config(target_modules=["lin0"]))
    # PEFT's matching: list entries match name endings, a string is a full-match regex.
    config = dpeft.IA3Config(target_modules="lin[01]", feedforward_modules=["n1"])
    assert config.is_feedforward("lin1") and not config.is_feedforward("lin0")
    assert dpeft.IA3Config(target_modules=".*", feedforward_modules="lin.").is_feedforward("lin1")


@pytest.mark.parametrize("config_cls", [dpeft.LoHaConfig, dpeft.LoKrConfig])
def test_lycoris_refuses_layers_peft_refuses(config_cls):
    """PEFT's LoHa/LoKr support nn.Linear/Conv1d/Conv2d only: transformers' Conv1D and embeddings are refused."""
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("emb_conv1d")[0], config_cls(target_modules=["conv1d", "emb"]))


def test_lokr_bad_init_is_refused():
    with pytest.raises(ValueError, match="init_weights"):
        dpeft.LoKrConfig(target_modules=["lin0"], init_weights="pissa")


def test_mixed_methods_in_one_model_switch(tmp_path):
    """Adapters of different methods on the same layers: each alone gives its own PEFT-equal output."""
    base, kw = build("mlp")
    ia3 = dpeft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    loha = dpeft.LoHaConfig(target_modules=["lin0", "lin1"], init_weights=False)
    model = dpeft.get_peft_model(base, ia3).eval()
    model.add_adapter("loha", loha)
    out_ia3 = out(model, kw)
    model.set_adapter("loha")
    out_loha = out(model, kw)
    model.save_pretrained(tmp_path)
    for name, expected in (("default", out_ia3), ("loha", out_loha)):
        sub = tmp_path if name == "default" else tmp_path / name
        loaded = peft.PeftModel.from_pretrained(build("mlp")[0], sub).eval()
        assert_close(out(loaded, kw), expected)


# ---------------------------------------------------------------------------------------------------- LN tuning
# LN tuning's common checks (checkpoints both ways, merge, disable, unload, two adapters, mixed batch) run on its
# case-table rows (tests/cases.py, perturbed after creation since the adapter starts as an exact copy of the norms).
def test_ln_tuning_refuses_layers_it_cannot_copy():
    """A layer with children is not one parameter set (PEFT copies it whole; dpeft refuses it clearly)."""
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("llama")[0], dpeft.LNTuningConfig(target_modules=["mlp"]))


# ---------------------------------------------------------------------------------------------------- sharded store
# The sharded backend needs no per-method code: the same parity check the LoRA rows pass (sharded forward and
# gradients on 2 gloo ranks equal the local model's) runs for each method here, through test_sharded_store's helper.
SHARDED_CONFIGS = {
    "ia3": lambda: dpeft.IA3Config(init_ia3_weights=False),  # llama defaults: k, v, down (feedforward)
    "loha": lambda: dpeft.LoHaConfig(target_modules=["q_proj", "v_proj"], r=3, init_weights=False),
    "lokr": lambda: dpeft.LoKrConfig(target_modules=["q_proj", "down_proj"], r=2, init_weights=False),
    "fourierft": lambda: dpeft.FourierFTConfig(target_modules=["q_proj", "v_proj"], n_frequency=40, scaling=10.0),
    "ln-tuning": lambda: dpeft.LNTuningConfig(),
    # Model-level shared projections (frozen, sharded like any other tensor) plus per-layer vectors.
    "vera": lambda: dpeft.VeraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=6, init_weights=False),
    # A trainable shared tensor: the bank's gradient sums over every layer that reads it, then is reduce-scattered.
    "vblora": lambda: dpeft.VBLoRAConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], vector_length=8, num_vectors=10, init_vector_bank_bound=0.5
    ),
    "randlora": lambda: dpeft.RandLoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], r=8, randlora_alpha=8, init_weights=False
    ),
    "c3a": lambda: dpeft.C3AConfig(target_modules=["q_proj", "down_proj"], block_size=8, init_weights="gaussian"),
    # Integer mask indices: a frozen store tensor registered under no module, sharded and gathered like the rest.
    "shira": lambda: dpeft.ShiraConfig(target_modules=["q_proj", "v_proj"], r=2, init_weights=False),
}

SHARDED_CONFIGS.update(
    {
        "oft": lambda: dpeft.OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8, init_weights=False),
        "boft": lambda: dpeft.BOFTConfig(
            target_modules=["q_proj", "v_proj"], boft_block_size=8, boft_n_butterfly_factor=2, init_weights=False
        ),
        "hra": lambda: dpeft.HRAConfig(target_modules=["q_proj", "down_proj"], r=4, apply_GS=True, init_weights=False),
        "delora": lambda: dpeft.DeloraConfig(target_modules=["q_proj", "v_proj"], r=4, init_weights=False),
    }
)
SHARDED_CONFIGS.update(
    {
        "adalora": lambda: dpeft.AdaLoraConfig(
            target_modules=["q_proj", "v_proj"], init_r=5, total_step=10, init_lora_weights=False
        )
    }
)
SHARDED_CONFIGS.update(
    {
        "miss": lambda: dpeft.MissConfig(target_modules=["q_proj", "down_proj"], r=6, init_weights=False),
        "miss-bat": lambda: dpeft.MissConfig(target_modules=["q_proj"], r=8, init_weights="bat"),
    }
)


# Methods that route rows by task: their inputs carry `task_ids` (kept apart from SHARDED_CONFIGS, which other
# tables read as weight-method rows without task ids). Neither has a merged form.
SHARDED_TASK_CONFIGS = {
    "poly": lambda: dpeft.PolyConfig(
        target_modules=["q_proj", "v_proj"], n_tasks=2, n_skills=3, n_splits=2, init_weights=False
    ),
    "multitask-prompt-tuning": lambda: dpeft.MultitaskPromptTuningConfig(
        num_virtual_tokens=3, num_tasks=2, num_ranks=2, task_type="CAUSAL_LM"
    ),
}


def _sharded_parity(names: list[str]) -> dict:
    import test_sharded_store

    # Runs in each spawned rank.
    test_sharded_store.CONFIGS.update({**SHARDED_CONFIGS, **SHARDED_TASK_CONFIGS})
    test_sharded_store.TASK_ROUTED.update(SHARDED_TASK_CONFIGS)
    test_sharded_store.NOT_MERGEABLE.update(SHARDED_TASK_CONFIGS)
    return {name: test_sharded_store._parity(name) for name in names}


@pytest.mark.dist
@pytest.mark.slow  # ~90 s on 2 shared cores: two ranks build the tiny llama ten times
def test_sharded_backend_matches_local_for_every_method():
    from dist_utils import run_distributed

    names = list(SHARDED_CONFIGS) + list(SHARDED_TASK_CONFIGS)
    per_rank = run_distributed(_sharded_parity, 2, names)
    for name in names:
        for rank, r in enumerate(rank_results[name] for rank_results in per_rank):
            assert r["backend"] == "sharded" and r["checked"] > 0, (name, rank, r)
            assert r["loss_diff"] < 1e-6 and r["logit_diff"] < 1e-5, (name, rank, r)
            assert r["value_diff"] == 0.0 and r["sd_diff"] == 0.0, (name, rank, r)
            assert r["grad_diff"] < 1e-6, (name, rank, r)


# ---------------------------------------------------------------------------------------------------- training parity
PARITY = [
    pytest.param(lambda: dpeft.IA3Config(task_type="CAUSAL_LM"), id="ia3"),
    pytest.param(
        lambda: dpeft.LoHaConfig(
            target_modules=["q_proj", "v_proj"], r=4, rank_dropout=0.3, module_dropout=0.3, task_type="CAUSAL_LM"
        ),
        id="loha-dropouts",
    ),
    pytest.param(
        lambda: dpeft.LoKrConfig(
            target_modules=["q_proj", "down_proj"],
            r=2,
            rank_dropout=0.3,
            rank_dropout_scale=True,
            task_type="CAUSAL_LM",
        ),
        id="lokr-dropout",
    ),
    pytest.param(
        lambda: dpeft.FourierFTConfig(
            target_modules=["q_proj", "v_proj"], n_frequency=40, scaling=10.0, task_type="CAUSAL_LM"
        ),
        id="fourierft",
    ),
    pytest.param(lambda: dpeft.LNTuningConfig(task_type="CAUSAL_LM"), id="ln-tuning"),
    pytest.param(
        lambda: dpeft.VeraConfig(
            target_modules=["q_proj", "v_proj", "down_proj"], r=8, vera_dropout=0.2, task_type="CAUSAL_LM"
        ),
        id="vera-dropout",
    ),
    pytest.param(
        lambda: dpeft.VBLoRAConfig(
            target_modules=["q_proj", "v_proj", "down_proj"],
            vector_length=8,
            num_vectors=16,
            topk=3,
            vblora_dropout=0.2,
            init_vector_bank_bound=0.5,
            task_type="CAUSAL_LM",
        ),
        id="vblora-dropout",
    ),
    pytest.param(
        lambda: dpeft.RandLoraConfig(
            target_modules=["q_proj", "v_proj", "down_proj"],
            r=8,
            randlora_alpha=16,
            randlora_dropout=0.2,
            sparse=True,
            task_type="CAUSAL_LM",
        ),
        id="randlora-sparse-dropout",
    ),
    # One C3A layer only: PEFT's hand-written backward gives a wrong INPUT gradient (its weight gradient is right;
    # see tests/test_method_c3a.py), so parity holds only where no trainable tensor sits upstream of a C3A layer.
    pytest.param(
        lambda: dpeft.C3AConfig(
            target_modules=["down_proj"], layers_to_transform=[1], block_size=8, task_type="CAUSAL_LM"
        ),
        id="c3a-last-layer",
    ),
    pytest.param(
        lambda: dpeft.ShiraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=2, task_type="CAUSAL_LM"),
        id="shira",
    ),
]

PARITY += [
    pytest.param(
        lambda: dpeft.OFTConfig(
            target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8, task_type="CAUSAL_LM"
        ),
        id="oft",
    ),
    pytest.param(
        lambda: dpeft.BOFTConfig(
            target_modules=["q_proj", "v_proj"], boft_block_size=4, boft_dropout=0.25, task_type="CAUSAL_LM"
        ),
        id="boft-dropout",
    ),
    pytest.param(lambda: dpeft.HRAConfig(target_modules=["q_proj", "v_proj"], r=4, task_type="CAUSAL_LM"), id="hra"),
    pytest.param(
        lambda: dpeft.DeloraConfig(
            target_modules=["q_proj", "v_proj"], r=4, module_dropout=0.2, task_type="CAUSAL_LM"
        ),
        id="delora-dropout",
    ),
]
PARITY += [
    pytest.param(
        lambda: dpeft.AdaLoraConfig(
            target_modules=["q_proj", "v_proj"], init_r=6, lora_dropout=0.2, total_step=10, task_type="CAUSAL_LM"
        ),
        id="adalora-orth-reg",
    ),
]
PARITY += [
    pytest.param(
        lambda: dpeft.MissConfig(target_modules=["q_proj", "down_proj"], r=6, miss_dropout=0.2, task_type="CAUSAL_LM"),
        id="miss-dropout",
    ),
    pytest.param(
        lambda: dpeft.MissConfig(target_modules=["q_proj", "v_proj"], r=8, init_weights="bat", task_type="CAUSAL_LM"),
        id="miss-bat",
    ),
]


PARITY += [
    pytest.param(lambda: dpeft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), id="prompt-tuning"),
    pytest.param(
        lambda: dpeft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
        id="p-tuning-mlp",
    ),
    pytest.param(
        lambda: dpeft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, task_type="CAUSAL_LM"),
        id="prefix-tuning-projection",
    ),
]


# Row id -> model of tests/models.py for rows whose inputs carry one task index per row (default: "llama").
PARITY_MODELS = {"poly": "llama_tasks", "multitask-prompt-tuning": "llama_tasks"}
PARITY += [
    pytest.param(lambda: dpeft.PolyConfig(n_tasks=2, n_skills=3, n_splits=2, task_type="CAUSAL_LM"), id="poly"),
    pytest.param(
        lambda: dpeft.MultitaskPromptTuningConfig(
            num_virtual_tokens=3, num_tasks=2, num_ranks=2, task_type="CAUSAL_LM"
        ),
        id="multitask-prompt-tuning",
    ),
]


def _train_losses(model, ids: torch.Tensor, seed: int, **extra: torch.Tensor) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    torch.manual_seed(seed)  # the dropout draws of both libraries start from the same state
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("factory", PARITY)
def test_training_matches_peft_step_by_step(factory, request):
    """Same seed, same init (see test_same_seed_gives_peft_tensors), same SGD steps: the same losses as PEFT,
    including rank and module dropout, whose random draws follow PEFT's order."""
    model_name = PARITY_MODELS.get(request.node.callspec.id, "llama")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    extra = {k: v for k, v in build(model_name)[1].items() if k != "input_ids"}  # e.g. task_ids
    torch.manual_seed(21)
    ours = dpeft.get_peft_model(build(model_name)[0], factory())
    torch.manual_seed(21)
    theirs = _peft_model(model_name, factory())
    ours_losses, theirs_losses = _train_losses(ours, ids, 5, **extra), _train_losses(theirs, ids, 5, **extra)
    assert ours_losses[-1] < ours_losses[0]
    for step, (a, b) in enumerate(zip(ours_losses, theirs_losses)):
        assert abs(a - b) < 1e-5, f"step {step}: dpeft {a:.6f} vs PEFT {b:.6f}"
