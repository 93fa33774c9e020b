"""`PeftModel` and its task classes: HF PEFT's user-facing model API over `AdapterModel`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dpeft.config import PeftConfig
from dpeft.model.forward_args import forward_extras
from dpeft.model.layer import BASE_ADAPTER
from dpeft.model.loading import conversion_mapping, remap_keys, restore, trainability
from dpeft.model.model_hooks import add_extra_losses
from dpeft.model.prompt import prompt_forward, word_embeddings_of
from dpeft.model.prompt_generate import causal_generate, seq2seq_generate
from dpeft.model.state import get_peft_model_state_dict, set_peft_model_state_dict
from dpeft.model.tuner import AdapterModel
from dpeft.store import load_adapter_weights, save_adapter_weights
from dpeft.store.fsdp_view import refuse_foreign_fsdp


class PeftModel(nn.Module):
    """A base model with adapters. Same constructor, attributes and methods as HF PEFT's `PeftModel`.

    Module paths are PEFT's: `base_model` is the tuner (`AdapterModel`, the user's model at `base_model.model`), or,
    for prompt-learning adapters, the user's model itself, with the encoders at `prompt_encoder.<adapter>` and the
    input embeddings at `word_embeddings` (the tuner is then held unregistered; `dpeft.model.tuner.tuner_of`).

    Args:
        model: The base model (a transformers model or any `nn.Module`).
        peft_config: Config of the first adapter.
        adapter_name: Its name.
        autocast_adapter_dtype: Keep adapter tensors in float32 on float16/bfloat16 bases (PEFT's default).
        low_cpu_mem_usage: Allocate adapter tensors without initialising them (a load fills them next).
    """

    #: How a prompt-learning adapter's virtual tokens enter this task's inputs (see `dpeft.model.prompt`).
    _prompt_task: str = "features"
    #: Names of head modules that this task class trains and saves in full (PEFT's convention).
    head_module_names: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self._add_head_modules(peft_config)
        self._is_prompt_learning = peft_config.is_prompt_learning
        if self._is_prompt_learning:
            # HF PEFT's layout: the user's model is `base_model`, the encoders are `prompt_encoder.<adapter>` and the
            # input embeddings `word_embeddings`; the tuner is held unregistered (its model is `base_model`).
            self.base_model = model
        tuner = AdapterModel(
            model,
            {adapter_name: peft_config},
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            init=not low_cpu_mem_usage,
            prompt_root=self if self._is_prompt_learning else None,
        )
        if self._is_prompt_learning:
            object.__setattr__(self, "_prompt_tuner", tuner)
            self.word_embeddings = word_embeddings_of(model)
        else:
            self.base_model = tuner
        self.special_peft_forward_args = {"adapter_names"}

    @property
    def _tuner(self) -> AdapterModel:
        """The `AdapterModel` that holds the adapters: `base_model`, or for prompt learning the unregistered one."""
        tuner = self.__dict__.get("_prompt_tuner")
        return self._modules["base_model"] if tuner is None else tuner

    def _add_head_modules(self, config: PeftConfig) -> None:
        if not self.head_module_names or not hasattr(config, "modules_to_save"):
            return
        current = list(config.modules_to_save or [])
        config.modules_to_save = current + [n for n in self.head_module_names if n not in current]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_prompt_tuner"):
                raise
            return getattr(self._tuner, name)  # the tuner's attributes, then the user's model's

    # ------------------------------------------------------------------ properties
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._tuner.peft_config

    @property
    def active_adapter(self) -> str | None:
        """The active adapter (the first one when several are active; None once all are deleted)."""
        active = self._tuner.active_adapter
        return active if isinstance(active, str) else (active[0] if active else None)

    @property
    def active_adapters(self) -> list[str]:
        return self._tuner.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def store(self):
        return self._tuner.store

    def get_base_model(self) -> nn.Module:
        return self._tuner.model

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _routing(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; loaded: {list(self.peft_config)}")
        ctx = self._tuner.ctx
        previous, ctx.adapter_names = ctx.adapter_names, list(adapter_names)
        try:
            yield
        finally:
            ctx.adapter_names = previous

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """Run the base model with the active adapters, or per-row adapters when `adapter_names` is given
        (one name per batch row; ``"__base__"`` for no adapter)."""
        refuse_foreign_fsdp(self._tuner.store)  # e.g. accelerate's FSDP2 plugin without dpeft's apply_fsdp
        if self._prompt_active(adapter_names):
            return prompt_forward(self, self._prompt_task, _ids_from_args(args, kwargs))
        with self._routing(adapter_names), forward_extras(self._tuner, kwargs):  # e.g. task_ids
            outputs = self.get_base_model()(*args, **kwargs)
        return add_extra_losses(outputs, self._tuner.model_hooks)  # e.g. AdaLoRA's orthogonal regulariser

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        if self._prompt_active(adapter_names):
            if self._prompt_task == "seq2seq":
                return seq2seq_generate(self, _ids_from_args(args, kwargs))
            return causal_generate(self, args, kwargs)
        if adapter_names is not None:
            beams = (
                kwargs.get("num_beams")
                or getattr(getattr(self.get_base_model(), "generation_config", None), "num_beams", 1)
                or 1
            )
            adapter_names = [n for n in adapter_names for _ in range(beams)]
        with self._routing(adapter_names), forward_extras(self._tuner, kwargs):
            return self.get_base_model().generate(*args, **kwargs)

    def _prompt_active(self, adapter_names: list[str] | None) -> bool:
        """Whether the active adapter is a prompt-learning one (and adapters are enabled)."""
        tuner = self._tuner
        if not tuner.prompt_encoders or tuner.prompts_disabled or self.active_adapter not in tuner.prompt_encoders:
            return False
        if adapter_names is not None:
            raise ValueError("adapter_names (per-row adapters) is not supported with prompt-learning adapters")
        return True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model runs without any adapter (merged adapters are unmerged first)."""
        self._tuner.disable_adapter_layers()
        try:
            yield
        finally:
            self._tuner.enable_adapter_layers()

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new (inactive) adapter; `set_adapter` activates it."""
        relayout = peft_config.is_prompt_learning != self._is_prompt_learning
        if relayout and self.peft_config:  # the module layouts differ (as in PEFT, which refuses the mix)
            raise ValueError(
                f"cannot add a {peft_config.peft_type} adapter to a model with {sorted(self.peft_config)}: "
                "prompt-learning adapters cannot be combined with adapters of another type (as in HF PEFT)"
            )
        if relayout:  # an emptied wrapper takes the other kind (e.g. one evaluator wrapper for many adapters)
            self._use_prompt_layout(peft_config.is_prompt_learning)
        self._add_head_modules(peft_config)
        active = self._tuner.active_adapter
        previous = self._tuner.autocast_adapter_dtype
        self._tuner.autocast_adapter_dtype = autocast_adapter_dtype
        try:
            self._tuner.inject_adapter(adapter_name, peft_config, init=not low_cpu_mem_usage)
        except BaseException:
            if relayout:
                self._use_prompt_layout(not peft_config.is_prompt_learning)
            raise
        finally:
            self._tuner.autocast_adapter_dtype = previous
        self._tuner.set_adapter(active)

    def _use_prompt_layout(self, prompt: bool) -> None:
        """Switch an adapter-less wrapper between PEFT's two module layouts (see `__init__`)."""
        tuner = self._tuner
        if prompt:
            del self.base_model
            self.base_model = tuner.model
            object.__setattr__(self, "_prompt_tuner", tuner)
            self.word_embeddings = word_embeddings_of(tuner.model)
        else:
            del self.__dict__["_prompt_tuner"], self.word_embeddings
            self._modules.pop("prompt_encoder", None)  # an empty holder, if any is left
            self.base_model = tuner
        object.__setattr__(tuner, "prompt_root", self if prompt else tuner)
        self._is_prompt_learning = prompt

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s); they become trainable unless `inference_mode` (or their config's) freezes them."""
        self._tuner.set_adapter(adapter_name)
        if inference_mode:
            for name in [adapter_name] if isinstance(adapter_name, str) else adapter_name:
                self.store.set_requires_grad(name, False)

    def delete_adapter(self, adapter_name: str) -> None:
        self._tuner.delete_adapter(adapter_name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._tuner.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._tuner.unmerge_adapter()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        quantized_merge: str = "requantize",
    ) -> nn.Module:
        """Merge and return the base model; `quantized_merge` ("requantize"/"dequantize") is for quantized bases."""
        return self._tuner.merge_and_unload(
            progressbar=progressbar,
            safe_merge=safe_merge,
            adapter_names=adapter_names,
            quantized_merge=quantized_merge,
        )

    def unload(self) -> nn.Module:
        return self._tuner.unload()

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counting packed 4-bit weights at their logical size as PEFT does."""
        trainable, total = 0, 0
        buffers = self.store.buffer_ids()  # tensors PEFT keeps as buffers, which it does not count
        for param in self.parameters():
            if id(param) in buffers:
                continue
            n = param.numel()
            if param.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of quant_storage
                n = n * 2 * (param.quant_storage.itemsize if hasattr(param, "quant_storage") else 1)
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each selected adapter in PEFT's format: `default` at the top, others in a subfolder of their name.

        `save_embedding_layers` also writes the base weights of embedding layers (True, False, or "auto": when
        one is targeted). `path_initial_model_for_weight_conversion` (PiSSA/OLoRA conversion) is not available.
        """
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError("path_initial_model_for_weight_conversion is not available in dpeft")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"cannot save adapters {missing}: not loaded; loaded adapters: {list(self.peft_config)}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a directory")
        # Where the store gathers full tensors with a collective, every rank must take part in it.
        states = (
            {
                n: get_peft_model_state_dict(self, adapter_name=n, save_embedding_layers=save_embedding_layers)
                for n in names
            }
            if (is_main_process or self.store.collective)
            else {}
        )
        if not is_main_process:
            return
        for name in names:
            directory = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            state = states[name]
            save_adapter_weights(state, directory, safe_serialization=safe_serialization)
            config = self.peft_config[name]
            inference_mode = config.inference_mode
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(self.get_base_model(), "name_or_path", None) or None
            config.inference_mode = True
            extra = {}
            if config.task_type is None:  # PEFT records the base class of models it has no task class for
                base_cls = type(self.get_base_model())
                extra["auto_mapping"] = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
            try:
                config.save_pretrained(directory, **extra)
            finally:
                config.inference_mode = inference_mode

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a PEFT-format adapter onto `model`. On any error the base model is left as it was.

        `key_mapping` (regex -> replacement, first match wins, applied without the ``base_model.model.`` prefix)
        renames checkpoint keys, by default with the model's `_checkpoint_conversion_mapping` as in PEFT.
        `ephemeral_gpu_offload` is accepted for PEFT compatibility and has no effect.
        """
        from dpeft.model.task_models import task_model_class

        config = (
            config if config is not None else PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        )
        config.inference_mode = not is_trainable
        model_cls = task_model_class(config.task_type) if cls is PeftModel else cls
        state = load_adapter_weights(os.path.join(model_id, kwargs.get("subfolder") or ""))
        state = remap_keys(state, key_mapping if key_mapping is not None else conversion_mapping(model))
        flags = trainability(model)
        try:
            peft_model = model_cls(
                model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=True
            )
        except BaseException:
            restore(flags)
            raise
        try:
            peft_model._load_state(state, adapter_name, torch_dtype)
        except BaseException:
            peft_model._tuner.delete_adapter(adapter_name, _rollback=True)
            restore(flags)  # injection froze the base; a failed load must leave it as it was
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def _load_state(self, state: dict[str, torch.Tensor], adapter_name: str, torch_dtype: torch.dtype | None) -> None:
        if torch_dtype is not None:
            for param in self.store.parameters(adapter_name):
                param.data = param.data.to(torch_dtype)
        set_peft_model_state_dict(self, state, adapter_name=adapter_name, assign=True)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        """Load another PEFT-format adapter under `adapter_name` (inactive until `set_adapter`)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} is already loaded; delete it or choose another name")
        config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config.inference_mode = not is_trainable
        state = load_adapter_weights(
            os.path.join(model_id, kwargs.get("subfolder") or ""), device=torch_device or "cpu"
        )
        mapping = key_mapping if key_mapping is not None else conversion_mapping(self.get_base_model())
        state = remap_keys(state, mapping)
        flags, was_prompt = trainability(self), self._is_prompt_learning
        try:
            self.add_adapter(
                adapter_name, config, low_cpu_mem_usage=True, autocast_adapter_dtype=autocast_adapter_dtype
            )
            self._load_state(state, adapter_name, torch_dtype)
        except BaseException:
            if adapter_name in self.peft_config:
                self._tuner.delete_adapter(adapter_name, _rollback=True)
            if not self.peft_config and self._is_prompt_learning != was_prompt:
                self._use_prompt_layout(was_prompt)  # an emptied wrapper had switched layout for this adapter
            restore(flags)
            raise
        if not is_trainable:
            self.eval()


def _ids_from_args(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Prompt-learning forwards take keyword arguments; a single positional argument is the input ids."""
    if len(args) > 1:
        raise TypeError("pass the inputs of a prompt-learning model as keyword arguments (input_ids=..., ...)")
    return {"input_ids": args[0], **kwargs} if args else dict(kwargs)
