"""What a merge changes: the model skeleton with the adapters injected, and per base tensor the merge steps.

The skeleton is the base model built on the meta device from its `config.json`, with each adapter injected by
dpeft's own injection, so every target gets the method layer and handler `merge_and_unload` would use. A plan
maps checkpoint tensor names to steps (one per adapter that changes the tensor); running a step calls the method
layer's own `merge_weight`/`merged_bias`. Nothing here knows any method.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from dpeft.checkpoint.dcp import resolve_checkpoint
from dpeft.checkpoint.dcp_manifest import MANIFEST, read_manifest
from dpeft.checkpoint.hf_shards import DTYPES, TensorFiles
from dpeft.config import PeftConfig, get_peft_config
from dpeft.config.peft_config import CONFIG_NAME
from dpeft.methods import MethodLayer, get_method
from dpeft.methods.hooks import ModelHooks
from dpeft.model import AdaptedLayer, ModulesToSaveWrapper, PeftModel, task_model_class
from dpeft.model.model_hooks import loaded_state
from dpeft.model.state import normalize_keys
from dpeft.store import PEFT_PREFIX, Entry
from dpeft.store.peft_io import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME


# ---------------------------------------------------------------------------------------------- adapters
class AdapterSource:
    """An adapter's config and its tensors under PEFT's (current) key names, read on demand.

    Args:
        path: A PEFT-format folder (``adapter_config.json`` + ``adapter_model.safetensors``), a dpeft
            distributed checkpoint step directory, or a checkpoint root (its newest complete step is used).
    """

    def __init__(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            path = resolve_checkpoint(path)
        self.path = path
        self._files: TensorFiles | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[str, str] = {}  # normalised key -> key in the source
        if not os.path.isdir(path):
            raise ValueError(f"adapter {path!r} is not a directory")
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            self.config = PeftConfig.from_pretrained(path)
            st = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
            if os.path.isfile(st):
                self._files = TensorFiles([st])  # lazy: each rank reads only the tensors of its shards
                names = self._files.keys()
            elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
                self._tensors = torch.load(os.path.join(path, WEIGHTS_NAME), map_location="cpu", weights_only=True)
                names = list(self._tensors)
            else:
                raise ValueError(f"adapter {path!r} has no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}")
        elif os.path.isfile(os.path.join(path, MANIFEST)):
            self.config, self._tensors = _read_distributed(path)
            names = list(self._tensors)
        else:
            raise ValueError(
                f"adapter {path!r} has neither {CONFIG_NAME} (a PEFT-format adapter folder) nor {MANIFEST} "
                "(a dpeft distributed checkpoint step directory), and holds no complete step-XXXXXXXX checkpoint"
            )
        names = self._apply_loaded_state(names)
        self._keys = {normalize_keys({k: None}).popitem()[0]: k for k in names}

    def _apply_loaded_state(self, names: list[str]) -> list[str]:
        """Tensors as the store holds them, for a method whose saved form differs (its `loaded_state` hook, e.g.
        VB-LoRA's top-k-only checkpoints); the source is then read whole, as the in-memory loader reads it."""
        hooks = get_method(self.config.peft_type).model_hooks
        if hooks is None or hooks.loaded_state is ModelHooks.loaded_state:
            return names  # the common case: stays lazy, each rank reads only what its shards need
        state = {k: self._files.get(k) for k in names} if self._files is not None else self._tensors
        self._files, self._tensors = None, loaded_state(self.config, "default", state)
        return list(self._tensors)

    def keys(self) -> list[str]:
        return list(self._keys)

    def match_weight_suffix(self, expected: set[str]) -> None:
        """Older PEFT saved some vectors as a module's ``.weight`` (e.g. DoRA's magnitude): a key that fits only
        without that suffix is that tensor (as the in-memory loader reads it)."""
        for key in list(self._keys):
            stem = key.removesuffix(".weight")
            if key not in expected and stem != key and stem in expected and stem not in self._keys:
                self._keys[stem] = self._keys.pop(key)

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._keys[key]
        return self._files.infos[src].shape if self._files is not None else tuple(self._tensors[src].shape)

    def get(self, key: str) -> torch.Tensor:
        src = self._keys[key]
        return self._files.get(src) if self._files is not None else self._tensors[src]


def _read_distributed(path: str) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config and full tensors of the adapter in a distributed checkpoint (``default``, or its only one)."""
    from dpeft.checkpoint.export import read_adapter_tensors

    adapters = read_manifest(path)["adapters"]
    name = "default" if "default" in adapters else (next(iter(adapters)) if len(adapters) == 1 else None)
    if name is None:
        raise ValueError(
            f"checkpoint {path!r} holds adapters {sorted(adapters)} and none is 'default'; "
            "export them with `dpeft export` and merge the one you want"
        )
    config = get_peft_config({**adapters[name], "inference_mode": True})
    return config, read_adapter_tensors(path)[name]


def check_base_name(config: PeftConfig, base_dir: str, adapter_path: str) -> None:
    """Refuse an adapter whose `base_model_name_or_path` names another model than the base folder."""
    want = config.base_model_name_or_path
    if not want:
        return
    if os.path.isdir(want) and os.path.samefile(want, base_dir):
        return
    have = os.path.basename(os.path.normpath(os.path.abspath(base_dir)))
    if os.path.basename(os.path.normpath(want)) != have:
        raise ValueError(
            f"adapter {adapter_path!r} was trained on base_model_name_or_path={want!r}, but the base folder is "
            f"{have!r}; pass the right base, or --ignore-name-mismatch if the folder is a renamed copy of that model"
        )


# ---------------------------------------------------------------------------------------------- skeleton
def build_skeleton(base_dir: str, configs: list[PeftConfig]) -> PeftModel:
    """The base model on the meta device (no memory for weights) with adapters ``adapter0..`` injected."""
    import transformers

    for cfg in configs:
        if get_method(cfg.peft_type).make_layer is None:  # it adapts no layer (prompt learning): no weight changes
            raise ValueError(
                f"a {cfg.peft_type} adapter changes the model's inputs, not its weights, so it cannot be merged "
                "into a checkpoint; serve it with PeftModel.from_pretrained instead"
            )

    config = transformers.AutoConfig.from_pretrained(base_dir)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise ValueError(
            f"{base_dir}/config.json names architectures {archs}, none of which transformers has; the merge builds "
            "the model skeleton from that class"
        )
    with torch.device("meta"):
        model = cls._from_config(config)
    peft_model = task_model_class(configs[0].task_type)(model, configs[0], "adapter0", low_cpu_mem_usage=True)
    for i, cfg in enumerate(configs[1:], start=1):
        peft_model.add_adapter(f"adapter{i}", cfg, low_cpu_mem_usage=True)
    return peft_model


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Step:
    """One adapter's change to one base tensor.

    Attributes:
        adapter: Index of the adapter (its position on the command line).
        kind: ``"weight"`` / ``"bias"`` (through the method layer) or ``"replace"`` (a saved module copy or a
            trained bias that replaces the base tensor).
        layer / method / entry: The adapted layer, its method layer for this adapter, the store entry.
        key: For ``"replace"``: the adapter key whose tensor replaces the base tensor.
    """

    adapter: int
    kind: str
    layer: AdaptedLayer | None = None
    method: MethodLayer | None = None
    entry: Entry | None = None
    key: str | None = None


class Resolver:
    """Maps the model's parameter names onto the base checkpoint's tensor names (prefixes, tied weights)."""

    def __init__(self, model: nn.Module, base: TensorFiles) -> None:
        self.base = base
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
        self.tied = dict(tied) if isinstance(tied, dict) else {}

    def __call__(self, name: str) -> str:
        candidates = [name, f"{self.prefix}.{name}" if self.prefix else None]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1 :])
        for c in candidates:
            if c and c in self.base:
                return c
        if name in self.tied:
            raise ValueError(
                f"{name} is tied to {self.tied[name]} and not stored in the base checkpoint; merging into it would "
                f"change {self.tied[name]} too. Target {self.tied[name]} instead, or untie the weights first"
            )
        raise ValueError(
            f"the base checkpoint has no tensor {name} (nor with the {self.prefix!r} prefix); "
            "the adapter does not fit this base model"
        )


def _param_name(module: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in module.named_parameters(recurse=False) if p is param)


def build_plan(peft_model: PeftModel, base: TensorFiles, sources: list[AdapterSource]) -> dict[str, list[Step]]:
    """Checkpoint tensor name -> the steps that change it, in adapter order; checks every key and shape first."""
    model = peft_model.get_base_model()
    resolve = Resolver(model, base)
    plan: dict[str, list[Step]] = {}
    for i, source in enumerate(sources):
        name = f"adapter{i}"
        store = peft_model.store
        expected = set(store.keys(name))
        source.match_weight_suffix(expected)
        keys = set(source.keys())
        extra = _base_tensor_keys(model, keys - expected)
        metas = {k: torch.empty(source.shape(k), device="meta") for k in keys - set(extra)}
        try:
            store.check_state_dict(name, metas)
        except ValueError as exc:
            raise ValueError(f"adapter {source.path}: {exc}") from None
        # Base tensors the adapter carries (trained biases, embedding weights) are loaded before any merge, as in
        # memory.
        for key, module_param in extra.items():
            target = resolve(module_param)
            _check_shape(base, target, source.shape(key), source)
            plan.setdefault(target, []).append(Step(i, "replace", key=key))
        for entry in store.entries(name):
            if entry.shared:
                continue  # model-level tensors (VeRA's projections): read through each layer's link, below
            module = model.get_submodule(entry.module_name)
            if isinstance(module, AdaptedLayer):
                if not module.methods[name].can_merge:  # a method whose change depends on more than the weights
                    kind = peft_model.peft_config[name].peft_type
                    raise ValueError(
                        f"adapter {source.path}: {kind} adapters cannot be merged into the base weights "
                        f"({entry.module_name} has no merged form)"
                    )
                base_layer, handler = module.base_layer, module.handler
                w_name = resolve(f"{entry.module_name}.{_param_name(base_layer, handler.weight_param)}")
                _check_shape(base, w_name, tuple(handler.weight_param.shape), source)
                plan.setdefault(w_name, []).append(Step(i, "weight", module, module.methods[name], entry))
                if handler.bias is not None:
                    b_name = resolve(f"{entry.module_name}.{_param_name(base_layer, handler.bias)}")
                    _check_shape(base, b_name, tuple(handler.bias.shape), source)
                    plan.setdefault(b_name, []).append(Step(i, "bias", module, module.methods[name], entry))
                else:
                    _check_no_bias_added(Step(i, "bias", module, module.methods[name], entry), source)
            elif isinstance(module, ModulesToSaveWrapper):
                for spec_name in entry.specs:
                    target = resolve(f"{entry.module_name}.{entry.specs[spec_name].save_suffix}")
                    _check_shape(base, target, tuple(entry.params[spec_name].shape), source)
                    plan.setdefault(target, []).append(Step(i, "replace", entry=entry, key=entry.peft_key(spec_name)))
            else:
                raise ValueError(
                    f"adapter {source.path}: tensors on {entry.module_name} "
                    f"({type(module).__name__}) cannot be merged into a checkpoint"
                )
    return plan


def _base_tensor_keys(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """Adapter keys that hold base tensors (biases trained with ``bias='all'|'lora_only'``, embedding weights PEFT
    saves when an embedding is targeted) -> the model parameter each replaces. Other keys stay unexpected."""
    params = {n.replace(".base_layer.", ".") for n, _ in model.named_parameters(remove_duplicate=False)}
    out = {}
    for key in sorted(keys):
        name = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
        if key.startswith(PEFT_PREFIX) and name in params:
            out[key] = name
    return out


def _check_shape(base: TensorFiles, name: str, want: tuple[int, ...], source: AdapterSource) -> None:
    have = base.infos[name].shape
    if tuple(have) != tuple(want):
        raise ValueError(
            f"base tensor {name} has shape {tuple(have)} but adapter {source.path} expects "
            f"{tuple(want)} (from the model config); the adapter does not fit this base model"
        )


# ---------------------------------------------------------------------------------------------- the math
def _adapter_tensors(step: Step, source: AdapterSource, compute: torch.dtype | None, meta: bool):
    out = {}
    entries = [step.entry] if step.entry.link is None else [step.entry, step.entry.link]  # + shared tensors
    for entry, name in [(e, n) for e in entries for n in e.specs]:
        dtype = entry.params[name].dtype  # what the store holds in memory (float32 on half bases)
        if compute is not None and dtype.is_floating_point:
            dtype = compute
        key = entry.peft_key(name)
        spec = entry.specs[name]
        if not spec.persistent:  # in no checkpoint: regenerated from the config (e.g. VeRA's projection_prng_key)
            out[name] = torch.zeros(spec.shape, dtype=dtype, device="meta" if meta else "cpu")
            if not meta and spec.init is not None:
                spec.init(out[name])
        elif meta:
            out[name] = torch.empty(source.shape(key), dtype=dtype, device="meta")
        else:
            t = source.get(key)
            out[name] = t.to(dtype) if t.is_floating_point() else t
            if spec.project is not None:  # what every in-memory read sees (`ParamSpec.project`), merging included
                out[name] = spec.project(out[name])
    return out


@torch.no_grad()
def apply_step(
    step: Step, current: torch.Tensor, source: AdapterSource, compute: torch.dtype | None, meta: bool = False
) -> torch.Tensor:
    """`current` after one adapter's step; the very same object when the step leaves it unchanged."""
    if step.kind == "replace":
        if meta:
            return torch.empty(source.shape(step.key), dtype=current.dtype, device="meta")
        return source.get(step.key).to(current.dtype)
    p = _adapter_tensors(step, source, compute, meta)
    handler = step.layer.handler
    if step.kind == "weight":
        return handler.stored_layout(step.method.merge_weight(handler.logical_layout(current), p))
    return step.method.merged_bias(current, p, +1)


def run_steps(
    tensor: torch.Tensor,
    steps: list[Step],
    sources: list[AdapterSource],
    weights: list[float],
    compute: torch.dtype | None,
) -> torch.Tensor:
    """The merged value of one base tensor, in its own dtype."""
    out_dtype = tensor.dtype
    current = tensor if compute is None else tensor.to(compute)
    for step in steps:
        new = apply_step(step, current, sources[step.adapter], compute)
        if new is current:
            continue
        w = weights[step.adapter]
        if w != 1.0:  # interpolate in float32 so that a half base does not lose the small change
            new = current.float() + w * (new.float() - current.float())
        current = new.to(out_dtype if compute is None else compute)
    return current.to(out_dtype)


def rehearse(
    plan: dict[str, list[Step]],
    base: TensorFiles,
    sources: list[AdapterSource],
    compute: torch.dtype | None,
) -> dict[str, tuple[tuple[int, ...], str, list[int]]]:
    """Run every step on meta tensors: shape errors surface before anything is written, and steps that change
    nothing (a bias the method leaves alone) drop out of the plan. Returns the changed tensors."""
    changed = {}
    for name in list(plan):
        info = base.infos[name]
        current = torch.empty(info.shape, dtype=DTYPES[info.dtype], device="meta")
        kept = []
        for step in plan[name]:
            try:
                new = apply_step(step, current, sources[step.adapter], compute, meta=True)
            except ValueError as exc:
                raise ValueError(f"cannot merge adapter {sources[step.adapter].path} into {name}: {exc}") from None
            except (NotImplementedError, RuntimeError):
                kept.append(step)  # the method's math does not run on meta tensors; checked when it runs for real
                continue
            if new is current:
                continue
            if tuple(new.shape) != tuple(info.shape):
                raise ValueError(
                    f"merging adapter {sources[step.adapter].path} into {name} gives shape "
                    f"{tuple(new.shape)}, not the base shape {tuple(info.shape)}"
                )
            kept.append(step)
        if kept:
            plan[name] = kept
            changed[name] = (info.shape, info.dtype, sorted({s.adapter for s in kept}))
        else:
            del plan[name]
    return changed


def _check_no_bias_added(step: Step, source: AdapterSource) -> None:
    """A layer without a bias: the method must not need one (e.g. LoRA's `lora_bias`), as in memory."""
    try:
        bias = step.method.merged_bias(None, _adapter_tensors(step, source, None, meta=True), +1)
    except ValueError as exc:
        raise ValueError(f"cannot merge adapter {source.path}: {exc}") from None
    if bias is not None:
        raise ValueError(f"adapter {source.path} adds a bias to {step.entry.module_name}, whose base layer has none")
