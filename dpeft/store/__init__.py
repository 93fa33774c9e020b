"""The adapter store: owner of every adapter tensor, PEFT key naming, and (later) sharding."""

from dpeft.store.holders import detach_holders
from dpeft.store.peft_io import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter_weights, save_adapter_weights
from dpeft.store.spec import ADAPTER, ParamSpec
from dpeft.store.store import PEFT_PREFIX, SHARED_PREFIX, AdapterStore, Entry

__all__ = [
    "ADAPTER",
    "PEFT_PREFIX",
    "SAFETENSORS_WEIGHTS_NAME",
    "SHARED_PREFIX",
    "WEIGHTS_NAME",
    "AdapterStore",
    "Entry",
    "ParamSpec",
    "detach_holders",
    "load_adapter_weights",
    "save_adapter_weights",
]
