"""`get_peft_model` and `inject_adapter_in_model`: HF PEFT's entry points."""

from __future__ import annotations

import copy

from torch import nn

from dpeft.config import PeftConfig
from dpeft.model import AdapterModel, PeftModel, set_peft_model_state_dict, task_model_class


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter; the class follows `peft_config.task_type` as in HF PEFT.

    The config is copied, so one config object can serve several models.
    """
    if mixed:
        raise ValueError(
            "mixed=True (PeftMixedModel) is not available in dpeft; any PeftModel can hold adapters "
            "of different methods through add_adapter"
        )
    peft_config = copy.deepcopy(peft_config)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
        model, "name_or_path", None
    )
    if peft_config.base_model_name_or_path is None and name_or_path:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    model_cls = task_model_class(peft_config.task_type)
    return model_cls(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Add an adapter's layers to `model` in place, without a `PeftModel` around it; returns `model`.

    With `state_dict` the adapter tensors are loaded from it (PEFT key names) after injection.
    """
    tuner = AdapterModel(model, {adapter_name: copy.deepcopy(peft_config)}, adapter_name, init=not low_cpu_mem_usage)
    model._dpeft_adapter_model = [tuner]  # keep the store reachable; a list so it is not registered as a submodule
    if state_dict is not None:
        try:
            set_peft_model_state_dict(tuner, state_dict, adapter_name=adapter_name)
        except BaseException:
            tuner.delete_adapter(adapter_name, _rollback=True)
            raise
    return model
