"""`AdapterModel`: the model with adapters injected (`PeftModel.base_model`), for every method.

Injection finds target modules, wraps each in one `AdaptedLayer`, asks the method for parameter specs and the
store for tensors. Adapter management (activate, delete, merge, unload) is written here once for all methods.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dpeft.config import PeftConfig
from dpeft.methods import get_method
from dpeft.methods.hooks import ModelHooks
from dpeft.model.forward_args import forward_extras
from dpeft.model.layer import AdaptedLayer, ForwardContext, check_mergeable
from dpeft.model.model_hooks import add_extra_losses, check_new_adapter, exported, make_hooks
from dpeft.model.modules_to_save import ModulesToSaveWrapper
from dpeft.model.prompt import add_prompt_adapter, check_combination, is_prompt_model, remove_prompt_adapter
from dpeft.model.targets import find_targets, resolve_target_modules
from dpeft.quant import get_handler, is_bnb_layer, quantized_handler, supported_layer_types
from dpeft.quant.merge import base_quantization, check_quantized_merge, dequantize_model, record_quantized_merge
from dpeft.store import AdapterStore, Entry, detach_holders
from dpeft.store.holders import walk_modules


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _adapter_dtype(base: torch.dtype, autocast: bool) -> torch.dtype:
    if autocast and base in (torch.float16, torch.bfloat16):
        return torch.float32
    return base if base.is_floating_point else torch.float32


class AdapterModel(nn.Module):
    """Holds the user's model (`.model`), the adapter configs and the store.

    Args:
        model: The base model; its target modules are replaced in place.
        peft_config: adapter name -> config of the first adapter.
        adapter_name: Name of that adapter.
        init: Initialise the new tensors (False when a checkpoint load fills all of them next).
        prompt_root: The module prompt-learning encoders hang under (``prompt_encoder.<adapter>``): the `PeftModel`,
            which keeps them at the top as HF PEFT does; default this module.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: dict[str, PeftConfig],
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = True,
        init: bool = True,
        prompt_root: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # Not registered as a submodule: the root holds this tuner (unregistered) in turn.
        object.__setattr__(self, "prompt_root", self if prompt_root is None else prompt_root)
        self.peft_config: dict[str, PeftConfig] = {}
        self.store = AdapterStore()
        self.model_hooks: dict[str, ModelHooks] = {}  # adapter -> its method's model-level hooks, where it has them
        self.ctx = ForwardContext()
        # Prompt-learning adapters (which adapt no layer): adapter -> (its PromptEncoder, its store entry).
        self.prompt_encoders: dict[str, tuple] = {}
        self.prompts_disabled = False
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(adapter_name, peft_config[adapter_name], init=init)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            hook = exported(self.__dict__.get("model_hooks", {}), name)  # model methods a method contributes
            return hook if hook is not None else getattr(self.model, name)

    def forward(self, *args, **kwargs):
        with forward_extras(self, kwargs):  # keyword arguments methods read in their layers (task_ids)
            return add_extra_losses(self.model(*args, **kwargs), self.model_hooks)

    def generate(self, *args, **kwargs):
        with forward_extras(self, kwargs):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ iteration
    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        for name, module in walk_modules(self.model):  # `named_modules` without the store's holders
            if isinstance(module, AdaptedLayer):
                yield name, module

    def _wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in walk_modules(self.model):
            if isinstance(module, (AdaptedLayer, ModulesToSaveWrapper)):
                yield name, module

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, adapter_name: str, config: PeftConfig, *, init: bool = True) -> None:
        """Add adapter `adapter_name` to every module `config` targets; all or nothing."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
        method = get_method(config.peft_type)
        config = copy.deepcopy(config)
        resolve_target_modules(config, self.model)
        self.peft_config[adapter_name] = config
        try:
            check_new_adapter(self.peft_config, config)
            self._inject(adapter_name, config, method, init)
            hooks = make_hooks(self, adapter_name, config)
            if hooks is not None:
                self.model_hooks[adapter_name] = hooks
        except BaseException:
            self.delete_adapter(adapter_name, _rollback=True)
            raise

    def _inject(self, adapter_name: str, config: PeftConfig, method, init: bool) -> None:
        check_combination(self, adapter_name, config)
        if method.make_encoder is not None:  # prompt learning: virtual tokens in the input, no layer adapted
            add_prompt_adapter(self, adapter_name, config, method, init)
            self._add_modules_to_save(adapter_name, config)
            self._mark_trainable(adapter_name, config)
            return
        matched, unsupported = 0, []
        # One walk finds the targets with their parents; nothing inside a wrapper is ever a target.
        targets = find_targets(self.model, config)
        handlers = {
            name: module.handler if isinstance(module, AdaptedLayer) else get_handler(module)
            for name, module, _ in targets
            if not isinstance(module, ModulesToSaveWrapper)
        }
        shared = self._declare_shared(adapter_name, config, method, handlers, init)
        for name, module, parent in targets:
            if isinstance(module, ModulesToSaveWrapper):
                unsupported.append(f"{name} (in modules_to_save)")
                continue
            handler = handlers[name]
            if handler is None:
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
            layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module, handler, self.store, self.ctx)
            method_layer = method.build_layer(handler, config, name)
            if method_layer is None:
                unsupported.append(f"{name} ({type(layer.base_layer).__name__})")
                continue
            if handler.kind == "linear" and hasattr(config, "fan_in_fan_out"):
                # The layer decides its weight layout; the saved config records it as PEFT's does.
                config.fan_in_fan_out = handler.fan_in_fan_out
            if layer is not module:
                _replace_child(parent, name.rpartition(".")[2], layer)
            dtype = _adapter_dtype(layer.handler.dtype, self.autocast_adapter_dtype)
            entry = self.store.declare(
                layer, name, adapter_name, method_layer.specs, device=layer.handler.device, dtype=dtype, init=init
            )
            if shared is not None:
                self.store.link(entry, shared, layer)
            if init:  # sees the shared tensors too (VBLoRA draws its bank per layer, in PEFT's order)
                method_layer.after_allocation(self.store.get(entry) if shared is not None else entry.params)
            layer.add(adapter_name, method_layer, entry)
            matched += 1
        if unsupported and not matched:
            raise ValueError(
                f"target modules {sorted(unsupported)[:8]} are not layer types {config.peft_type} supports; "
                f"supported: {', '.join(supported_layer_types())}"
            )
        if not matched:
            names = [n for n, _ in self.model.named_modules() if n][:12]
            raise ValueError(
                f"Target modules {config.target_modules} not found in the base model. Please check the target modules "
                f"and try again. Some module names of this model: {names}"
            )
        self._add_modules_to_save(adapter_name, config)
        self._mark_trainable(adapter_name, config)

    def _declare_shared(self, adapter_name: str, config: PeftConfig, method, handlers, init: bool) -> Entry | None:
        """Declare the method's model-level tensors of this adapter (registered on this module, as PEFT keeps them on
        its tuner), sized from the handlers of all targeted layers (name -> handler, None where no handler fits);
        None for methods without shared tensors."""
        if method.shared_specs is None:
            return None
        handlers = {name: handler for name, handler in handlers.items() if handler is not None}
        specs = method.shared_specs(config, handlers) if handlers else []
        if not specs:
            return None
        first = next(iter(handlers.values()))
        dtype = _adapter_dtype(first.dtype, self.autocast_adapter_dtype)
        return self.store.declare(
            self, "", adapter_name, specs, device=first.device, dtype=dtype, init=init, shared=True
        )

    def _add_modules_to_save(self, adapter_name: str, config: PeftConfig) -> None:
        names = getattr(config, "modules_to_save", None) or []
        if not names:
            return
        found = [
            n
            for n, _ in walk_modules(self.model, stop=(AdaptedLayer, ModulesToSaveWrapper))  # none inside a wrapper
            if n and any(n == t or n.endswith(f".{t}") for t in names)
        ]
        for name in found:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(module, self.ctx)
                parent, child = _parent(self.model, name)
                setattr(parent, child, wrapper)
                module = wrapper
            clone = module.add(adapter_name)
            self.store.adopt(name, adapter_name, {n: (p, n) for n, p in clone.named_parameters()})

    def _mark_trainable(self, adapter_name: str, config: PeftConfig) -> None:
        # The base's own parameters (the store's, in the holders this walk skips, are set just below).
        for _, module in walk_modules(self.model):
            for param in module._parameters.values():
                if param is not None:
                    param.requires_grad_(False)
        for name in self.peft_config:
            self.store.set_requires_grad(
                name, name in self.active_adapters and not self.peft_config[name].inference_mode
            )
        # As in PEFT, the bias setting of every active adapter applies (adding an adapter must not freeze the
        # biases the active one trains).
        for active in self.active_adapters:
            active_config = self.peft_config.get(active)
            if active_config is not None and not active_config.inference_mode:
                self._mark_biases_trainable(getattr(active_config, "bias", "none"), active)

    def _mark_biases_trainable(self, bias: str, adapter_name: str) -> None:
        if bias == "none":
            return
        for name, param in self.model.named_parameters():
            if bias == "all" and name.endswith("bias") and "modules_to_save" not in name:
                param.requires_grad_(True)
        if bias.endswith("_only"):  # "<method>_only": the biases of the layers this adapter adapts train
            for _, layer in self.adapted_layers():
                if adapter_name in layer.methods and layer.handler.bias is not None:
                    layer.handler.bias.requires_grad_(True)

    # ------------------------------------------------------------------ management
    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate adapter(s); the active ones become trainable (unless in inference mode), the others frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"adapter(s) {missing} not found; loaded adapters: {list(self.peft_config)}")
        for _, module in self._wrappers():
            module.__dict__["active_adapters"] = list(names)  # a plain attribute: no nn.Module.__setattr__ checks
        self.active_adapter = adapter_name
        for name, config in self.peft_config.items():
            self.store.set_requires_grad(name, name in names and not config.inference_mode)

    def delete_adapter(self, adapter_name: str, _rollback: bool = False) -> None:
        """Remove an adapter and its tensors; layers left without adapters get their base layer back."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; loaded adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for name, module in list(self._wrappers()):
            module.remove(adapter_name)
            empty = not module.methods if isinstance(module, AdaptedLayer) else not len(module.modules_to_save)
            if empty:
                parent, child = _parent(self.model, name)
                setattr(
                    parent, child, module.base_layer if isinstance(module, AdaptedLayer) else module.original_module
                )
        self.store.remove(adapter_name)
        self.model_hooks.pop(adapter_name, None)
        remove_prompt_adapter(self, adapter_name)
        detach_holders(self, adapter_name)  # model-level (shared) tensors
        if not _rollback and adapter_name in self.active_adapters:
            # As in PEFT: the other active adapters stay active; with none left, the first remaining one is.
            remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
            # With no adapter left nothing is active, so a later add_adapter does not re-activate a deleted name.
            self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)

    def enable_adapter_layers(self) -> None:
        self.prompts_disabled = False
        for _, module in self._wrappers():
            module.disable_adapters = False

    def disable_adapter_layers(self) -> None:
        self.prompts_disabled = True
        for _, module in self._wrappers():
            module.disable_adapters = True

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        _refuse_prompt_merge(self)
        if self.store.backend == "fsdp2":
            raise ValueError(
                "merge_adapter (merge in place, keep training) is not available under the fsdp2 backend: FSDP2 "
                "re-gathers the unmerged shards at every forward. Use merge_and_unload(), which unwraps the model."
            )
        check_mergeable((layer for _, layer in self.adapted_layers()), adapter_names)  # all or nothing
        for _, layer in self.adapted_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapted_layers():
            layer.unmerge()

    def _unload(
        self,
        merge: bool,
        progressbar: bool,
        safe_merge: bool,
        adapter_names: list[str] | None,
        quantized_merge: str = "requantize",
    ) -> nn.Module:
        check_quantized_merge(quantized_merge)
        if merge:
            _refuse_prompt_merge(self)
            check_mergeable((layer for _, layer in self.adapted_layers()), adapter_names)  # before unwrapping any
            # A backend that wraps the whole model (fsdp2) gives it back with full weights on every rank first.
            self.store.localize()
        quantization = base_quantization(self.model) if merge else None
        dequantize = merge and quantized_merge == "dequantize"
        wrappers = list(self._wrappers())
        for name, module in tqdm(wrappers, disable=not progressbar, desc="Unloading " + ("and merging " * merge)):
            parent, child = _parent(self.model, name)
            if isinstance(module, AdaptedLayer):
                if dequantize and is_bnb_layer(module.base_layer):
                    _replace_base_layer(module, quantized_handler(module.base_layer).to_float_module())
                if merge:
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                setattr(parent, child, module.base_layer)
            else:
                active = next((a for a in module.active_adapters if a in module.modules_to_save), None)
                setattr(parent, child, module.modules_to_save[active] if active else module.original_module)
        for name in list(self.peft_config):
            self.store.remove(name)
            remove_prompt_adapter(self, name)
            detach_holders(self, name)
        self.peft_config.clear()
        self.model_hooks.clear()
        if dequantize:
            dequantize_model(self.model)
        if quantization is not None:
            record_quantized_merge(self.model, quantized_merge, quantization)
        return self.model

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        quantized_merge: str = "requantize",
    ) -> nn.Module:
        """Merge adapters into the base weights and return the plain base model.

        Args:
            quantized_merge: For quantized (bitsandbytes) base layers: ``"requantize"`` quantizes the merged weight
                back into the layer (PEFT's behaviour; rounds to the quantization grid), ``"dequantize"`` returns a
                float model (every quantized layer becomes an `nn.Linear`). See `dpeft.quant.merge`.
        """
        return self._unload(True, progressbar, safe_merge, adapter_names, quantized_merge)

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the plain base model."""
        return self._unload(False, False, False, None)


def tuner_of(model: nn.Module) -> AdapterModel:
    """The `AdapterModel` behind `model`: a `PeftModel`'s (registered as ``base_model``, or held unregistered for
    prompt learning, where ``base_model`` is the user's model as in HF PEFT), or `model` itself.

    Raises:
        TypeError: if `model` carries no dpeft adapters.
    """
    tuner = model if isinstance(model, AdapterModel) else getattr(model, "_tuner", None)
    if tuner is None:
        tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, AdapterModel):
        raise TypeError(f"{type(model).__name__} has no dpeft adapters; build it with dpeft.get_peft_model first")
    return tuner


def _replace_child(parent: nn.Module, name: str, module: nn.Module) -> None:
    """``setattr(parent, name, module)`` for a registered child `name`: straight into ``_modules`` where that is
    all `nn.Module.__setattr__` would do (its checks cost as much as building the wrapper)."""
    plain = type(parent).__setattr__ is nn.Module.__setattr__ and name in parent._modules
    if plain and not nn.modules.module._global_module_registration_hooks:
        parent._modules[name] = module
    else:
        setattr(parent, name, module)


def _replace_base_layer(layer: AdaptedLayer, base_layer: nn.Module) -> None:
    """Put another base layer under `layer`, with its handler given to the layer and its method layers."""
    handler = get_handler(base_layer)
    layer.base_layer, layer.handler = base_layer, handler
    for method in layer.methods.values():
        method.handler = handler


def _refuse_prompt_merge(tuner: AdapterModel) -> None:
    if is_prompt_model(tuner):
        raise ValueError(
            "prompt-learning adapters (virtual tokens) cannot be merged into the base weights; keep the PeftModel "
            "for inference, or use unload() to get the base model back without them"
        )
