"""The public surface, frozen: growth or change shows up here as a reviewed diff.

Also: PEFT-style code runs against `import dpeft as peft`, nothing outside `dpeft/methods/` names a method, and
`import dpeft` stays free of the heavy optional dependencies.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest
import torch
from models import build

import dpeft
from dpeft.methods.registry import _METHODS

DPEFT_ALL = [
    "AdaLoraConfig",
    "AdapterStore",
    "BOFTConfig",
    "C3AConfig",
    "DeloraConfig",
    "FourierFTConfig",
    "HRAConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "MissConfig",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PolyConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "RandLoraConfig",
    "ShiraConfig",
    "TaskType",
    "VBLoRAConfig",
    "VeraConfig",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "registered_methods",
    "set_peft_model_state_dict",
]

# Names of dpeft's own (not in HF PEFT's public API).
DPEFT_ONLY = {"AdapterStore", "registered_methods"}

PEFT_MODEL_PUBLIC = [
    "active_adapter",
    "active_adapters",
    "active_peft_config",
    "add_adapter",
    "delete_adapter",
    "disable_adapter",
    "from_pretrained",
    "generate",
    "get_base_model",
    "get_nb_trainable_parameters",
    "head_module_names",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "peft_config",
    "print_trainable_parameters",
    "save_pretrained",
    "set_adapter",
    "store",
    "unload",
    "unmerge_adapter",
]

LORA_CONFIG_FIELDS = [
    ("peft_type", None),
    ("task_type", None),
    ("inference_mode", False),
    ("base_model_name_or_path", None),
    ("revision", None),
    ("auto_mapping", None),
    ("r", 8),
    ("target_modules", None),
    ("exclude_modules", None),
    ("lora_alpha", 8),
    ("lora_dropout", 0.0),
    ("fan_in_fan_out", False),
    ("bias", "none"),
    ("use_rslora", False),
    ("modules_to_save", None),
    ("init_lora_weights", True),
    ("layers_to_transform", None),
    ("layers_pattern", None),
    ("rank_pattern", {}),
    ("alpha_pattern", {}),
    ("use_dora", False),
    ("lora_bias", False),
]


def test_all_is_frozen():
    assert sorted(dpeft.__all__) == DPEFT_ALL
    for name in dpeft.__all__:
        assert hasattr(dpeft, name), name


def test_all_names_exist_in_peft():
    peft = pytest.importorskip("peft")
    missing = [n for n in DPEFT_ALL if n not in DPEFT_ONLY and not hasattr(peft, n)]
    assert not missing, f"dpeft exports names HF PEFT does not have: {missing}"


def test_peft_model_public_methods_are_frozen():
    base = set(dir(torch.nn.Module))
    public = sorted(n for n in dir(dpeft.PeftModel) if not n.startswith("_") and n not in base)
    assert public == PEFT_MODEL_PUBLIC


def test_lora_config_fields_are_frozen():
    fields = [
        (f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(dpeft.LoraConfig)
    ]
    assert fields == LORA_CONFIG_FIELDS


SIGNATURES = [
    ("get_peft_model", lambda m: m.get_peft_model),
    ("PeftModel.from_pretrained", lambda m: m.PeftModel.from_pretrained),
    ("PeftModel.save_pretrained", lambda m: m.PeftModel.save_pretrained),
    ("PeftModel.load_adapter", lambda m: m.PeftModel.load_adapter),
    ("PeftModel.add_adapter", lambda m: m.PeftModel.add_adapter),
    ("PeftModel.set_adapter", lambda m: m.PeftModel.set_adapter),
    ("PeftModel.delete_adapter", lambda m: m.PeftModel.delete_adapter),
    ("PeftModel.merge_and_unload", lambda m: m.PeftModel.merge_and_unload),
    ("get_peft_model_state_dict", lambda m: m.get_peft_model_state_dict),
    ("set_peft_model_state_dict", lambda m: m.set_peft_model_state_dict),
]


@pytest.mark.parametrize("name, get", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_signatures_accept_peft_arguments(name, get):
    """Every argument PEFT's function takes (by position and name) dpeft takes too, with the same default."""
    peft = pytest.importorskip("peft")
    if name == "PeftModel.merge_and_unload":
        theirs = inspect.signature(peft.tuners.lora.LoraModel.merge_and_unload)
    else:
        theirs = inspect.signature(get(peft))
    ours = inspect.signature(get(dpeft))
    our_params = list(ours.parameters.values())
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in our_params)
    for i, param in enumerate(theirs.parameters.values()):
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if param.name not in ours.parameters:
            assert has_var_kw and param.kind is param.KEYWORD_ONLY, f"{name}: no argument {param.name!r}"
            continue
        mine = ours.parameters[param.name]
        if param.kind is not param.KEYWORD_ONLY:
            assert our_params.index(mine) == i, f"{name}: {param.name!r} is not at position {i}"
        assert mine.default == param.default, f"{name}: default of {param.name!r}"


def test_peft_style_code_runs(tmp_path):
    import dpeft as peft

    model, kw = build("llama")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.05,
        bias="none",
        task_type=peft.TaskType.CAUSAL_LM,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(model, config)
    assert isinstance(model, peft.PeftModelForCausalLM)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # 2 layers; q: 32 -> 32, v: 32 -> 16
    model.eval()
    expected = model(**kw).logits
    model.save_pretrained(tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).peft_type == peft.PeftType.LORA
    loaded = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path)
    torch.testing.assert_close(loaded(**kw).logits, expected, atol=1e-5, rtol=0)
    state = peft.get_peft_model_state_dict(loaded)
    assert all(k.startswith("base_model.model.model.layers.") for k in state)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(**kw).logits, expected, atol=1e-5, rtol=0)
    assert peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING["SEQ_CLS"] is peft.PeftModelForSequenceClassification


# ------------------------------------------------------------------------------------- method names stay in methods/
ROOT = pathlib.Path(dpeft.__file__).parent

# (file, token) pairs outside dpeft/methods/ that may name a method, each with the reason.
ALLOWED = {
    # The default adapter of a run config: user-facing data, not a code path.
    ("config/run_config.py", '"LORA"'),
    ("config/run_config.py", '"lora_alpha"'),
    # An example in an error message for a user-written run config.
    ("train/setup.py", '"peft.peft_type must name the method, e.g. LORA"'),
}
# Files that are examples of user code (they use the public API the way a user would).
ALLOWED_FILES = {"cli/demo.py"}


def _method_words() -> re.Pattern:
    words = {"dora"}  # a LoRA variant, registered under LoRA
    for method in _METHODS.values():
        words.add(method.name.lower())
        words.add(method.prefix.rstrip("_").lower())
    # "QLoRA" names the quantized-base recipe (any method on a 4-bit base), not a method.
    # ... and "missing" is English, not the MiSS method.
    special = {"lora": r"(?<!q)lora", "miss": r"miss(?!ing)"}
    alternatives = [special.get(w, re.escape(w)) for w in sorted(words)]
    return re.compile("|".join(alternatives), re.IGNORECASE)


def _reexports() -> set[str]:
    """What dpeft/__init__.py may say: each registered method's config class and its package name."""
    names = set()
    for method in _METHODS.values():
        names |= {method.config_cls.__name__, f'"{method.config_cls.__name__}"'}
        names.add(method.config_cls.__module__.split(".")[2])
    return names


def _code_tokens(path: pathlib.Path):
    """(line, text) of identifiers and non-docstring strings; comments and docstrings are prose."""
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL):
            continue
        docstring = tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if tok.type == tokenize.NAME or (tok.type == tokenize.STRING and not docstring):
            yield tok.start[0], tok.string
        previous = tok.type


def test_no_method_names_outside_methods():
    pattern, reexports = _method_words(), _reexports()
    assert pattern.search("lora_A") and pattern.search("LORA") and not pattern.search("QLoRA")
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("methods/") or rel in ALLOWED_FILES:
            continue
        for line, text in _code_tokens(path):
            if not pattern.search(text) or (rel, text) in ALLOWED:
                continue
            if rel == "__init__.py" and text in reexports:
                continue
            offenders.append(f"dpeft/{rel}:{line}: {text[:60]}")
    assert not offenders, "method names outside dpeft/methods/:\n" + "\n".join(offenders)


def test_allowlist_entries_are_still_needed():
    """An allowlist entry whose token is gone must be removed, so the list stays meaningful."""
    for rel, text in ALLOWED:
        tokens = {t for _, t in _code_tokens(ROOT / rel)}
        assert text in tokens, f"stale allowlist entry: {rel} no longer contains {text}"
    for rel in ALLOWED_FILES:
        assert (ROOT / rel).is_file(), f"stale allowlist entry: {rel}"


def test_import_dpeft_stays_light():
    code = (
        "import sys, dpeft; print(sorted(m for m in ('deepspeed', 'ray', 'bitsandbytes', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
