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
        shared_specs: For methods with model-level tensors shared by all layers of an adapter (VeRA's projections,
            VBLoRA's vector bank): ``shared_specs(config, handlers) -> list[ParamSpec]``, called once per adapter with
            the handlers of every targeted layer (name -> handler) before any layer is built; None otherwise.
        model_hooks: A `dpeft.methods.hooks.ModelHooks` subclass for model-level behaviour (extra loss terms,
            model methods, saved-state rules; AdaLoRA's rank allocation), instantiated per adapter; None otherwise.
        make_encoder: For prompt-learning methods, which adapt no layer (``make_layer=None``) but add virtual
            tokens to the model's input: builds the method's `PromptEncoder` from its config; None otherwise.
        forward_kwargs: Names of per-call keyword arguments of the model's ``forward`` / ``generate`` that the
            method's layers read (Poly's ``task_ids``): `PeftModel` takes them out of the call while an adapter of
            the method is loaded and hands them to each layer's `MethodLayer.forward` (see
            `MethodLayer.forward_kwargs`, which must list the same names).
    """

    name: str
    config_cls: type[PeftConfig]
    make_layer: object
    prefix: str
    shared_specs: object = None
    model_hooks: type | None = None
    make_encoder: object = None
    forward_kwargs: tuple[str, ...] = ()

    def build_layer(self, handler: BaseHandler, config: PeftConfig, module_name: str) -> MethodLayer | None:
        return None if self.make_layer is None else self.make_layer(handler, config, module_name)


_METHODS: dict[str, Method] = {}


def register_method(
    *,
    name: str,
    config_cls: type[PeftConfig],
    make_layer,
    prefix: str,
    shared_specs=None,
    model_hooks=None,
    make_encoder=None,
    forward_kwargs: tuple[str, ...] = (),
) -> None:
    """Register a method under its `peft_type` name; a second registration of a name is an error."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if config_cls.PEFT_TYPE != name:
        raise ValueError(f"{config_cls.__name__}.PEFT_TYPE is {config_cls.PEFT_TYPE!r}, expected {name!r}")
    register_config_class(name, config_cls)
    _METHODS[name] = Method(
        name,
        config_cls,
        make_layer,
        prefix,
        shared_specs,
        model_hooks=model_hooks,
        make_encoder=make_encoder,
        forward_kwargs=tuple(forward_kwargs),
    )


def get_method(name: str) -> Method:
    """The registered method for a `peft_type` value; a clear error for one dpeft does not have."""
    key = getattr(name, "value", name)
    if key not in _METHODS:
        raise ValueError(f"unknown PEFT method {key!r}; available methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def registered_methods() -> list[str]:
    return sorted(_METHODS)
