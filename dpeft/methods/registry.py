"""The method registry: each method package makes one `register_method` call in its `__init__`."""

from __future__ import annotations

from dataclasses import dataclass

from dpeft.config import PeftConfig, register_config_class
from dpeft.methods.base import MethodLayer
from dpeft.quant import BaseHandler


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: The `peft_type` value, e.g. ``"LORA"``.
        config_cls: Its config dataclass.
        make_layer: Builds the `MethodLayer` for one base layer; returns None when the method cannot sit on
            that kind of layer (the injector then reports the layer type).
        prefix: The prefix of its parameter names (``"lora_"``), used to mark them in reprs and messages.
    """

    name: str
    config_cls: type[PeftConfig]
    make_layer: object
    prefix: str

    def build_layer(self, handler: BaseHandler, config: PeftConfig, module_name: str) -> MethodLayer | None:
        return self.make_layer(handler, config, module_name)


_METHODS: dict[str, Method] = {}


def register_method(*, name: str, config_cls: type[PeftConfig], make_layer, prefix: str) -> None:
    """Register a method under its `peft_type` name; a second registration of a name is an error."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if config_cls.PEFT_TYPE != name:
        raise ValueError(f"{config_cls.__name__}.PEFT_TYPE is {config_cls.PEFT_TYPE!r}, expected {name!r}")
    register_config_class(name, config_cls)
    _METHODS[name] = Method(name, config_cls, make_layer, prefix)


def get_method(name: str) -> Method:
    """The registered method for a `peft_type` value; a clear error for one dpeft does not have."""
    key = getattr(name, "value", name)
    if key not in _METHODS:
        raise ValueError(f"unknown PEFT method {key!r}; available methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def registered_methods() -> list[str]:
    return sorted(_METHODS)
