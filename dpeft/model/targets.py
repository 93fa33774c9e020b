"""Which modules of a model an adapter config targets: names, regexes, "all-linear", per-model defaults."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from dpeft.config import PeftConfig
from dpeft.model.layer import AdaptedLayer
from dpeft.model.modules_to_save import ModulesToSaveWrapper
from dpeft.store.holders import walk_modules

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

# Default LoRA-style targets per transformers `model_type` (the same table HF PEFT uses).
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
    )


def resolve_target_modules(config: PeftConfig, model: nn.Module) -> None:
    """Fill in `config.target_modules` when it is None (per-model default) or "all-linear" (every linear layer
    except the output head), the way HF PEFT does; other values are left as they are."""
    fill_defaults = getattr(config, "fill_model_defaults", None)
    if fill_defaults is not None:
        # A method with its own per-model defaults (its own target table, or fields that go with it) sets them first.
        fill_defaults(getattr(getattr(model, "config", None), "model_type", None))
    targets = getattr(config, "target_modules", "<none>")
    if targets == "<none>":
        return
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"target_modules is not set and dpeft has no default for model_type {model_type!r}; "
                f"set target_modules (module names, a regex, or {ALL_LINEAR!r})"
            )
        default = DEFAULT_TARGET_MODULES[model_type]
        config.target_modules = list(default) if isinstance(default, list) else default
        return
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        exclude: set[str] = set()
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is None and getattr(config, "task_type", None) == "SEQ_CLS":
            output = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if hasattr(model, n)), None)
        names, wrapped = [], []
        for name, module in model.named_modules():
            if any(name.startswith(w + ".") for w in wrapped):
                continue  # a wrapper's base layer, adapter tensors or saved copies: never targets themselves
            if isinstance(module, (AdaptedLayer, ModulesToSaveWrapper)):
                wrapped.append(name)
                module = module.base_layer if isinstance(module, AdaptedLayer) else module.original_module
            if module is output:
                exclude.add(name)
            elif _is_linear(module) and name:
                names.append(name)
        config.target_modules = sorted(n for n in names if n not in exclude)


def _layer_index_ok(config: PeftConfig, key: str) -> bool:
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = getattr(config, "layers_pattern", None)
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _name_matcher(spec: list[str] | str) -> Callable[[str], bool]:
    """PEFT's name rule, prepared once: a string is a regex the whole name must match; a list matches a name equal
    to an entry or ending in ``.<entry>`` (looked up per dot-suffix of the name instead of per entry)."""
    if isinstance(spec, str):
        return re.compile(spec).fullmatch
    names = set(spec)

    def matches(key: str) -> bool:
        if key in names:
            return True
        dot = key.find(".")
        while dot != -1:
            if key[dot + 1 :] in names:
                return True
            dot = key.find(".", dot + 1)
        return False

    return matches


def target_matcher(config: PeftConfig) -> Callable[[str], bool]:
    """A function telling whether a module name is targeted by `config` (HF PEFT's matching rules), its patterns
    compiled once (injection asks it about every module name)."""
    targets = getattr(config, "target_modules", None)
    if targets is None:
        return lambda key: False
    exclude = getattr(config, "exclude_modules", None)
    excluded = _name_matcher(exclude) if exclude else None
    to_save = [
        re.compile(rf"(^|.*\.){re.escape(m)}($|\..*)").match for m in getattr(config, "modules_to_save", None) or []
    ]
    targeted = _name_matcher(targets)
    by_layer = not isinstance(targets, str) and getattr(config, "layers_to_transform", None) not in (None, [])

    def matches(key: str) -> bool:
        if (excluded is not None and excluded(key)) or any(m(key) for m in to_save) or not targeted(key):
            return False
        return not by_layer or _layer_index_ok(config, key)

    return matches


def find_targets(model: nn.Module, config: PeftConfig) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, module, parent) of every module of `model` that `config` targets, in `named_modules` order, in one
    walk. Wrappers (adapted layers, modules to save) are candidates themselves; nothing inside one ever is."""
    matches = target_matcher(config)
    found, by_name = [], {}
    for name, module in walk_modules(model, stop=(AdaptedLayer, ModulesToSaveWrapper)):
        by_name[name] = module
        if name and matches(name):
            found.append((name, module, by_name[name.rpartition(".")[0]]))
    return found
