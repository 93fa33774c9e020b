"""The streaming checkpoint merge (`dpeft merge`) in one process: results equal `merge_and_unload`, errors stop
before anything is written. Multi-rank and crash tests are in test_merge_dist.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import dpeft
from dpeft.checkpoint import merge_checkpoint
from dpeft.checkpoint.hf_shards import OutTensor, ShardWriter, assign_shards, parse_size, plan_shards, read_header
from dpeft.cli.main import main as cli_main
from dpeft.methods import get_method, registered_methods

# One merge case per mergeable method (PEFT field names); a method registered without a row fails
# `test_every_registered_method_has_a_merge_case`.
ATTN = ["q_proj", "v_proj", "down_proj"]
METHOD_CASES: dict[str, tuple[str, dict]] = {
    "lora": ("LORA", dict(target_modules=ATTN, init_lora_weights=False)),
    "lora-rslora-patterns": (
        "LORA",
        dict(
            target_modules=ATTN,
            init_lora_weights=False,
            use_rslora=True,
            r=4,
            lora_alpha=16,
            rank_pattern={"down_proj": 2},
        ),
    ),
    "dora": ("LORA", dict(target_modules=ATTN, init_lora_weights=False, use_dora=True)),
    # PEFT saves the base weight of a targeted embedding with the adapter: the merge loads it, as in memory.
    "lora-embedding": ("LORA", dict(target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)),
    "ia3": (
        "IA3",
        dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
    ),
    "loha": ("LOHA", dict(target_modules=ATTN, r=4, alpha=8, init_weights=False)),
    "lokr": ("LOKR", dict(target_modules=ATTN, r=4, alpha=8, init_weights=False)),
    "oft": ("OFT", dict(target_modules=ATTN, r=0, oft_block_size=4, init_weights=False)),
    "oft-embedding-exact-cayley": (
        "OFT",
        dict(
            target_modules=["embed_tokens", "q_proj"], oft_block_size=4, use_cayley_neumann=False, init_weights=False
        ),
    ),
    # Constrained OFT: the saved (unprojected) blocks are projected before merging, as merge_and_unload does.
    "oft-coft": ("OFT", dict(target_modules=ATTN, oft_block_size=4, init_weights=False, coft=True, eps=0.05)),
    "boft": ("BOFT", dict(target_modules=ATTN, boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)),
    "hra": ("HRA", dict(target_modules=ATTN, r=4, init_weights=False)),
    "hra-gram-schmidt": ("HRA", dict(target_modules=ATTN, r=3, apply_GS=True, init_weights=False)),
    "delora": ("DELORA", dict(target_modules=ATTN, r=4, delora_lambda=3, init_weights=False)),
    "fourierft": ("FOURIERFT", dict(target_modules=ATTN, n_frequency=64, scaling=10.0, init_weights=False)),
    "ln_tuning": ("LN_TUNING", dict(target_modules=["input_layernorm", "norm"])),
    "miss": ("MISS", dict(target_modules=ATTN, r=6, init_weights=False)),
    "miss-bat": ("MISS", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights="bat")),
    "miss-mini": ("MISS", dict(target_modules=ATTN, r=4, init_weights="mini", mini_r=8)),
    "adalora": ("ADALORA", dict(target_modules=ATTN, init_r=4, lora_alpha=8, total_step=10, init_lora_weights=False)),
    # A rank pattern (as the allocator writes it) prunes triplets: the merge builds the layers at the kept rank.
    "adalora-rank-pattern": (
        "ADALORA",
        dict(
            target_modules=["q_proj", "v_proj"],
            init_r=4,
            total_step=10,
            init_lora_weights=False,
            rank_pattern={
                "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False],
                "model.layers.1.self_attn.v_proj.lora_E": [False, False, False, False],
            },
        ),
    ),
    # Shared model-level tensors: the merge reads them through each layer (tests/test_method_vera.py: unsaved ones).
    "vera": ("VERA", dict(target_modules=ATTN, r=8, init_weights=False)),
    "vblora": ("VBLORA", dict(target_modules=ATTN, vector_length=8, num_vectors=16, init_vector_bank_bound=0.5)),
    # PEFT's top-k-only checkpoint form (indices + weights instead of logits), rebuilt by the method's load hook.
    "vblora-topk": (
        "VBLORA",
        dict(
            target_modules=ATTN,
            vector_length=8,
            num_vectors=16,
            init_vector_bank_bound=0.5,
            save_only_topk_weights=True,
        ),
    ),
    "randlora": ("RANDLORA", dict(target_modules=ATTN, r=8, randlora_alpha=8, init_weights=False)),
    "c3a": ("C3A", dict(target_modules=ATTN, block_size=8, init_weights="gaussian")),
    "shira": ("SHIRA", dict(target_modules=ATTN, r=2, init_weights=False)),
}
NOT_MERGEABLE: set[str] = set()  # registered methods that have no merged form (e.g. prompt learning)
NOT_MERGEABLE.add("POLY")  # the change depends on each row's task; tests/test_method_poly.py checks the refusal
# Prompt learning changes the inputs, not a weight: test_prompt_adapter_is_refused checks the refusal.
NOT_MERGEABLE.update({"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"})
ATOL = 1e-5
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7], [3, 3, 8, 21, 50, 11, 0, 17]])


def make_config(peft_type: str, kwargs: dict) -> dpeft.PeftConfig:
    return get_method(peft_type).config_cls(task_type="CAUSAL_LM", **kwargs)


def save_base(model: torch.nn.Module, directory: str, shard: str = "20KB") -> str:
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


def save_adapter(model: torch.nn.Module, config: dpeft.PeftConfig, directory: str, base_name: str, seed: int = 1):
    """The dpeft model with a non-trivial adapter, saved in PEFT format with `base_name` as its base."""
    torch.manual_seed(seed)
    config.base_model_name_or_path = base_name
    peft_model = dpeft.get_peft_model(model, config).eval()
    with torch.no_grad():  # move every method off its init (LN tuning starts as a copy of the base)
        for param in peft_model.store.parameters():
            if param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(directory)
    return peft_model


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    path = save_base(tiny_llama(), str(tmp_path_factory.mktemp("bases") / "tiny-llama"))
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) >= 4
    return path


def run_merge(base: str, adapters: list[str], out: str, **kw):
    return merge_checkpoint(base, adapters, out, progress=False, **{"shard_size": "30KB", **kw})


# ---------------------------------------------------------------------------------------------- methods
def test_every_registered_method_has_a_merge_case() -> None:
    covered = {peft_type for peft_type, _ in METHOD_CASES.values()} | NOT_MERGEABLE
    missing = sorted(set(registered_methods()) - covered)
    assert not missing, f"add a merge case for {missing} to METHOD_CASES in tests/test_merge.py"


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_merge_equals_merge_and_unload(case: str, llama_dir: str, tmp_path) -> None:
    peft_type, kwargs = METHOD_CASES[case]
    if peft_type not in registered_methods():
        pytest.skip(f"{peft_type} is not in dpeft (yet)")
    peft_model = save_adapter(tiny_llama(), make_config(peft_type, kwargs), str(tmp_path / "adapter"), "tiny-llama")
    adapted = logits(peft_model)
    expected = logits(peft_model.merge_and_unload())
    report = run_merge(llama_dir, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    assert report.changed and len(report.shards) >= 3
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    got = logits(merged)
    assert (got - expected).abs().max().item() <= ATOL
    assert (got - adapted).abs().max().item() <= 1e-4
    assert (got - logits(tiny_llama().eval())).abs().max().item() > 1e-3, "the adapter changed nothing"


def test_gpt2_conv1d_layout_and_trained_bias(tmp_path) -> None:
    """transformers Conv1D stores (in, out): the handler turns it round for the method and back."""
    base = save_base(tiny_gpt2(), str(tmp_path / "tiny-gpt2"))
    config = dpeft.LoraConfig(
        target_modules=["c_attn", "c_fc"],
        init_lora_weights=False,
        bias="lora_only",
        lora_bias=True,
        task_type="CAUSAL_LM",
    )
    peft_model = save_adapter(tiny_gpt2(), config, str(tmp_path / "adapter"), "tiny-gpt2")
    with torch.no_grad():  # a trained base bias is saved with the adapter and lands in the merged model
        peft_model.get_base_model().transformer.h[0].attn.c_attn.base_layer.bias.add_(0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = logits(peft_model.merge_and_unload().eval())
    run_merge(base, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    got = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval())
    assert (got - expected).abs().max().item() <= ATOL


def test_modules_to_save_replace_the_base_module(llama_dir: str, tmp_path) -> None:
    config = dpeft.LoraConfig(
        target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = save_adapter(tiny_llama(), config, str(tmp_path / "adapter"), "tiny-llama")
    with torch.no_grad():
        peft_model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = logits(peft_model.merge_and_unload())
    report = run_merge(llama_dir, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    assert "lm_head.weight" in report.changed
    got = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval())
    assert (got - expected).abs().max().item() <= ATOL


def test_two_adapters_with_weights(llama_dir: str, tmp_path) -> None:
    """W' = W + w1 * delta1 + w2 * delta2 for LoRA."""
    models = []
    for i in range(2):
        config = dpeft.LoraConfig(
            target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False, task_type="CAUSAL_LM"
        )
        models.append(save_adapter(tiny_llama(), config, str(tmp_path / f"a{i}"), "tiny-llama", seed=10 + i))
    run_merge(llama_dir, [str(tmp_path / "a0"), str(tmp_path / "a1")], str(tmp_path / "out"), weights=[0.5, -2.0])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    base = tiny_llama().state_dict()
    for name, layer in models[0].base_model.adapted_layers():
        key = f"{name}.weight"
        d0 = layer.get_delta_weight("default")
        d1 = dict(models[1].base_model.adapted_layers())[name].get_delta_weight("default")
        torch.testing.assert_close(merged[key], base[key] + 0.5 * d0 - 2.0 * d1, atol=1e-6, rtol=1e-5)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


@pytest.mark.parametrize("merge_dtype", ["keep", "float32"])
def test_bfloat16_base_keeps_its_dtype(merge_dtype: str, tmp_path) -> None:
    base = save_base(tiny_llama().to(torch.bfloat16), str(tmp_path / "tiny-llama"))
    config = dpeft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = save_adapter(tiny_llama().to(torch.bfloat16), config, str(tmp_path / "adapter"), "tiny-llama")
    expected = peft_model.merge_and_unload().state_dict()
    run_merge(base, [str(tmp_path / "adapter")], str(tmp_path / "out"), merge_dtype=merge_dtype)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.bfloat16
    if merge_dtype == "keep":  # the very computation merge_and_unload does
        assert torch.equal(merged[key], expected[key])
    else:  # one rounding to bfloat16 at the end: within one bfloat16 step of the in-memory result
        torch.testing.assert_close(merged[key].float(), expected[key].float(), atol=0.02, rtol=0.01)


# ---------------------------------------------------------------------------------------------- safety
@pytest.fixture
def lora_adapter(tmp_path) -> str:
    config = dpeft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    save_adapter(tiny_llama(), config, str(tmp_path / "adapter"), "tiny-llama")
    return str(tmp_path / "adapter")


def _nothing_written(tmp_path, out: str) -> None:
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_dry_run_lists_targets_and_writes_nothing(llama_dir: str, lora_adapter: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "out")
    cli_main(["merge", "--base", llama_dir, "--adapter", lora_adapter, "--out", out, "--dry-run"])
    text = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj.weight" in text and "[32, 32]" in text
    assert "4 tensors change" in text
    _nothing_written(tmp_path, out)


def test_cli_merges_and_refuses_existing_output(llama_dir: str, lora_adapter: str, tmp_path) -> None:
    out = str(tmp_path / "out")
    args = ["merge", "--base", llama_dir, "--adapter", lora_adapter, "--out", out, "--no-progress"]
    cli_main(args + ["--shard-size", "40KB"])
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert sorted(os.listdir(out)) == sorted(
        set(index["weight_map"].values()) | {"config.json", "generation_config.json", "model.safetensors.index.json"}
    )
    before = os.stat(os.path.join(out, "config.json")).st_ino
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        cli_main(args)
    assert os.stat(os.path.join(out, "config.json")).st_ino == before
    cli_main(args + ["--overwrite", "--shard-size", "1GB"])  # replaced: now a single file
    assert "model.safetensors" in os.listdir(out) and "model.safetensors.index.json" not in os.listdir(out)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_name_mismatch_stops_unless_ignored(lora_adapter: str, tmp_path) -> None:
    other = save_base(tiny_llama(), str(tmp_path / "other-llama"))
    with pytest.raises(ValueError, match="base_model_name_or_path='tiny-llama'.*'other-llama'"):
        run_merge(other, [lora_adapter], str(tmp_path / "out"))
    _nothing_written(tmp_path, str(tmp_path / "out"))
    run_merge(other, [lora_adapter], str(tmp_path / "out"), ignore_name_mismatch=True)
    assert os.path.isdir(str(tmp_path / "out"))


def test_wrong_shape_names_the_tensor(lora_adapter: str, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    base = save_base(wide, str(tmp_path / "tiny-llama"))
    with pytest.raises(
        ValueError, match=r"q_proj\.lora_A\.weight: checkpoint shape \(8, 32\) != model shape \(8, 48\)"
    ):
        run_merge(base, [lora_adapter], str(tmp_path / "out"))
    _nothing_written(tmp_path, str(tmp_path / "out"))


def test_missing_base_tensor_names_it(llama_dir: str, lora_adapter: str, tmp_path) -> None:
    """A base folder whose files lack a target tensor (e.g. a truncated download)."""
    from safetensors.torch import save_file

    base = str(tmp_path / "tiny-llama")
    os.makedirs(base)
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(llama_dir, name)) as src, open(os.path.join(base, name), "w") as dst:
            dst.write(src.read())
    state = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(base, "model.safetensors"))
    with pytest.raises(ValueError, match=r"no tensor model\.layers\.1\.self_attn\.v_proj\.weight"):
        run_merge(base, [lora_adapter], str(tmp_path / "out"))
    _nothing_written(tmp_path, str(tmp_path / "out"))


def test_tied_target_is_refused(tmp_path) -> None:
    base = save_base(tiny_gpt2(), str(tmp_path / "tiny-gpt2"))
    config = dpeft.LoraConfig(target_modules=["lm_head"], init_lora_weights=False, task_type="CAUSAL_LM")
    save_adapter(tiny_gpt2(), config, str(tmp_path / "adapter"), "tiny-gpt2")
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to transformer\.wte\.weight"):
        run_merge(base, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    _nothing_written(tmp_path, str(tmp_path / "out"))


def test_bias_on_a_biasless_layer_is_refused(llama_dir: str, tmp_path) -> None:
    """Llama's projections have no bias, so `lora_bias` cannot merge (merge_and_unload raises the same)."""
    config = dpeft.LoraConfig(
        target_modules=["q_proj"], init_lora_weights=False, lora_bias=True, task_type="CAUSAL_LM"
    )
    save_adapter(tiny_llama(), config, str(tmp_path / "adapter"), "tiny-llama")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: cannot merge lora_bias"):
        run_merge(llama_dir, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    _nothing_written(tmp_path, str(tmp_path / "out"))


def test_argument_errors(llama_dir: str, lora_adapter: str, tmp_path) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        run_merge(llama_dir, [lora_adapter], out, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="output folder is the base folder"):
        run_merge(llama_dir, [lora_adapter], llama_dir, overwrite=True)
    with pytest.raises(ValueError, match="cannot read size"):
        run_merge(llama_dir, [lora_adapter], out, shard_size="2 gigs")
    with pytest.raises(ValueError, match="has neither adapter_config.json"):
        run_merge(llama_dir, [llama_dir], out)
    _nothing_written(tmp_path, out)


# ---------------------------------------------------------------------------------------------- shard files
def test_shard_writer_round_trips_through_safetensors(tmp_path) -> None:
    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(7),
        "c": torch.randn(2, 2, 2),
        "e": torch.zeros(0, 4),
    }
    plan = [
        OutTensor(k, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32"}[v.dtype], tuple(v.shape))
        for k, v in tensors.items()
    ]
    path = str(tmp_path / "x.safetensors")
    writer = ShardWriter(path, plan)
    for t in plan:
        writer.write(t.name, tensors[t.name])
    writer.close()
    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    infos, meta = read_header(path)
    assert list(infos) == ["b", "a", "c", "e"] and meta == {"format": "pt"}
    assert (8 + infos["b"].begin) % 8 == 0


def test_shard_plan_and_assignment() -> None:
    tensors = [OutTensor(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 50, 1])]
    shards = plan_shards(tensors, 100)  # bytes: 40 40 120 20 200 4
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert assign_shards([80, 120, 20, 200, 4], 2) == [[2, 3], [0, 1, 4]]  # loads 220, 204
    assert assign_shards([80, 120], 4) == [[1], [0], [], []]
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(7) == 7


def test_distributed_checkpoint_adapter(llama_dir: str, tmp_path) -> None:
    """A dpeft distributed checkpoint step directory merges like the same adapter in PEFT format."""
    from dpeft.checkpoint.dcp import save_checkpoint

    config = dpeft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = save_adapter(tiny_llama(), config, str(tmp_path / "adapter"), "tiny-llama")
    save_checkpoint(str(tmp_path / "ckpt"), 2, peft_model, None, {})
    with torch.no_grad():  # the newest step holds other values: a root must resolve to it, not to step 2
        for p in peft_model.store.parameters("default"):
            p.mul_(1.5)
    step = save_checkpoint(str(tmp_path / "ckpt"), 3, peft_model, None, {})
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    run_merge(llama_dir, [step], str(tmp_path / "from_dcp"))
    run_merge(llama_dir, [str(tmp_path / "ckpt")], str(tmp_path / "from_root"))
    run_merge(llama_dir, [str(tmp_path / "adapter")], str(tmp_path / "from_peft"))
    for name in os.listdir(tmp_path / "from_peft"):
        with open(tmp_path / "from_peft" / name, "rb") as a:
            expected = a.read()
        for other in ("from_dcp", "from_root"):
            with open(tmp_path / other / name, "rb") as b:
                assert b.read() == expected, (other, name)


def test_adapter_folder_that_is_neither_is_refused(llama_dir: str, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete step-XXXXXXXX checkpoint"):
        run_merge(llama_dir, [str(tmp_path / "empty")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use_dora", [False, True])
def test_hf_peft_adapter_equals_hf_peft_merge(use_dora: bool, llama_dir: str, tmp_path) -> None:
    """An adapter saved by HF PEFT (the test-only oracle) merges to what PEFT's own merge_and_unload gives."""
    import peft

    torch.manual_seed(5)
    config = peft.LoraConfig(
        target_modules=["q_proj", "v_proj", "gate_proj"],
        init_lora_weights=False,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
        base_model_name_or_path="tiny-llama",
    )
    model = peft.get_peft_model(tiny_llama(), config).eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    expected = logits(model.merge_and_unload())
    run_merge(llama_dir, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    got = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval())
    assert (got - expected).abs().max().item() <= ATOL


def test_safe_merge_stops_on_nan(llama_dir: str, tmp_path) -> None:
    config = dpeft.LoraConfig(target_modules=["v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    dpeft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "adapter"))
    # save_pretrained refuses non-finite tensors, so the bad file is written by hand (as another tool might).
    path = str(tmp_path / "adapter" / "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"NaN or inf in model\.layers\.1\.self_attn\.v_proj\.weight"):
        run_merge(llama_dir, [str(tmp_path / "adapter")], out, safe_merge=True, ignore_name_mismatch=True)
    _nothing_written(tmp_path, out)


def test_prompt_adapter_is_refused(llama_dir: str, tmp_path) -> None:
    config = dpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    dpeft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="(?i)merge"):
        run_merge(llama_dir, [str(tmp_path / "adapter")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
