"""Holder modules: where the store registers adapter tensors so that module paths are PEFT's.

PEFT keeps ``q_proj.lora_A.default.weight``: a `ModuleDict` per tensor kind and a module per adapter. dpeft builds
that path from `_Holder` modules (containers of holders and parameters only) and registers the store's tensors at
its leaves. Loading an adapter makes four holders per adapted layer, so they are built without `nn.Module.__init__`
and walked without generators; the helpers here are what injection, loading and deletion share.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.modules import module as _module_mod


def _module_state() -> tuple[dict, tuple[tuple[str, type], ...]]:
    """The attributes `nn.Module.__init__` gives every module: plain values, and (name, type) of its empty
    containers, which every instance needs fresh."""
    state = dict(nn.Module().__dict__)
    containers = tuple((k, type(v)) for k, v in state.items() if isinstance(v, (dict, set, list)))
    assert not any(state[k] for k, _ in containers), "a new module has empty containers"
    return {k: v for k, v in state.items() if not isinstance(v, (dict, set, list))}, containers


_PLAIN, _CONTAINERS = _module_state()
# The containers `nn.Module` reads through `__dict__` (its `__getattr__`/`__setattr__`), so they must be there.
_EAGER = ("_parameters", "_buffers", "_modules")


class _LazyContainer:
    """A class attribute that gives each instance its own empty container on first access (stored on the
    instance, which then shadows this non-data descriptor)."""

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type | None = None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.kind()
        return value


class _Holder(nn.ModuleDict):
    """Container module that gives adapter parameters PEFT's module paths (``lora_A.default.weight``).

    Holders are never called and rarely hooked, so their hook dicts are made on first use: a loaded model has four
    holders per adapted layer, and a dozen fresh dicts each were a tenth of a load's time.
    """

    def train(self, mode: bool = True) -> _Holder:
        # Holders hold only holders and parameters: set the flag without nn.Module's per-attribute __setattr__
        # (an eval() of a loaded model visits four of these per adapted layer).
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        stack = [self]
        while stack:
            holder = stack.pop()
            holder.__dict__["training"] = mode
            stack.extend(holder._modules.values())
        return self


def _make_lazy(cls: type[nn.Module]) -> None:
    for name, kind in _CONTAINERS:
        if name not in _EAGER:
            lazy = _LazyContainer(kind)
            lazy.__set_name__(cls, name)
            setattr(cls, name, lazy)


_make_lazy(_Holder)


def _new_holder() -> _Holder:
    holder = _Holder.__new__(_Holder)
    holder.__dict__.update(_PLAIN, _parameters={}, _buffers={}, _modules={})
    return holder


def init_module_state(module: nn.Module) -> None:
    """Give `module` the attributes ``nn.Module.__init__`` gives (fresh containers), in place of that call: for
    classes whose own ``__init__`` adds nothing before it. ``nn.Module.__init__`` sets each attribute through
    ``__setattr__`` and costs several times this; injection builds one wrapper per adapted layer."""
    attrs = module.__dict__
    attrs.update(_PLAIN)
    for name, kind in _CONTAINERS:
        attrs[name] = kind()


def attach(owner: nn.Module, path: Sequence[str], param: nn.Parameter) -> None:
    """Register `param` under `owner` at `path` (``("lora_A", "default", "weight")``), making holders on the way."""
    module = owner
    for part in path[:-1]:
        child = module._modules.get(part)
        if child is None:
            child = _new_holder()
            if type(module) is _Holder:  # holds only holders and parameters: no attribute to collide with
                assert part not in module._parameters, f"{part} is both a parameter and a holder"
                module._modules[part] = child
            else:
                _add_child(module, part, child)
        module = child
    if type(module) is _Holder:
        assert path[-1] not in module._modules, f"{path[-1]} is both a holder and a parameter"
        module._parameters[path[-1]] = param
    else:
        module.register_parameter(path[-1], param)


def _add_child(module: nn.Module, name: str, child: nn.Module) -> None:
    """`module.add_module(name, child)` for a name not in use, without its `hasattr` probe (a failing attribute
    lookup through `nn.Module.__getattr__`, which costs more than the rest of building a holder)."""
    taken = name in module.__dict__ or name in module._parameters or name in module._buffers
    if taken or _module_mod._global_module_registration_hooks or hasattr(type(module), name):
        module.add_module(name, child)  # nn.Module's own checks (a name in use is an error) and hooks
    else:
        module._modules[name] = child


def detach_holders(owner: nn.Module, adapter: str) -> None:
    """Remove `adapter`'s tensors from the holder modules under `owner` (and holders left empty)."""
    for name, child in list(owner._modules.items()):
        if isinstance(child, _Holder):
            child._modules.pop(adapter, None)
            child._parameters.pop(adapter, None)
            for sub in child._modules.values():
                if isinstance(sub, _Holder):
                    detach_holders(sub, adapter)
            if not child._modules and not child._parameters:
                del owner._modules[name]


def walk_modules(root: nn.Module, stop: tuple[type, ...] = ()) -> list[tuple[str, nn.Module]]:
    """``list(root.named_modules())`` in the same order, less the store's holders below `root` and what lies inside
    a module of a `stop` type (which is itself listed).

    Finding wrappers, targets or embeddings never needs the holders (a quarter of a loaded model's modules are
    holders), and a stack walk costs a third of `named_modules`' nested generators; a load walks the model several
    times. Each module is listed once, under the first name it is reached by, as in `named_modules`.
    """
    seen: set[int] = set()
    found: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append((name, module))
        children = module._modules
        if children and not (stop and module is not root and isinstance(module, stop)):
            prefix = f"{name}." if name else ""
            for key, child in reversed(children.items()):  # reversed onto the stack: popped in order
                if child is not None and type(child) is not _Holder:
                    stack.append((prefix + key, child))
    return found


def walk_parameters(root: nn.Module) -> list[nn.Parameter]:
    """``list(root.parameters())`` as a set of tensors (holders included; order not kept), without its named walk."""
    seen_modules: set[int] = set()
    params: dict[int, nn.Parameter] = {}
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for param in module._parameters.values():
            if param is not None:
                params[id(param)] = param
        stack.extend(child for child in module._modules.values() if child is not None)
    return list(params.values())
