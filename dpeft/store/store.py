"""`AdapterStore`: the single owner of every adapter tensor of a model.

Method layers declare `ParamSpec`s at injection and ask for their tensors in forward; where those tensors live
(plain parameters, shards, DTensors) is the backend's business. Keys are HF PEFT's saved key names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dpeft.store.spec import ParamSpec

PEFT_PREFIX = "base_model.model."


class _Holder(nn.ModuleDict):
    """Container module that gives adapter parameters PEFT's module paths (``lora_A.default.weight``)."""


@dataclass
class Entry:
    """The tensors of one adapter on one module (a method layer, or a copied module to save)."""

    adapter: str
    module_name: str
    specs: dict[str, ParamSpec]
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    bucket: int = 0
    #: The module the tensors are registered under (None for adopted entries, whose module owns them).
    owner: nn.Module | None = field(default=None, repr=False)
    #: True once the sharded backend holds only this rank's shard of each tensor in `params`.
    sharded: bool = False

    def peft_key(self, name: str) -> str:
        return f"{PEFT_PREFIX}{self.module_name}.{self.specs[name].save_suffix}"


class AdapterStore:
    """Holds all adapters of one model and the tensors behind them.

    Args:
        backend: Name of the backend; ``"local"`` keeps plain parameters in one process.
    """

    def __init__(self, backend: str = "local") -> None:
        if backend != "local":
            raise ValueError(f"store backend {backend!r} is not available; available: 'local'")
        self.backend = backend
        self._sharded = None  # the ShardedBackend once `shard()` ran
        self._replicated: set[int] = set()  # adopted entries whose gradients the sharded backend averages
        self._entries: dict[str, list[Entry]] = {}
        self._by_key: dict[str, dict[str, tuple[Entry, str]]] = {}

    # ---------------------------------------------------------------- declaring
    def declare(
        self,
        owner: nn.Module,
        module_name: str,
        adapter: str,
        specs: Iterable[ParamSpec],
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
        init: bool = True,
    ) -> Entry:
        """Allocate the tensors of `specs` for `adapter`, registered under `owner` at PEFT's module paths.

        With ``init=False`` the tensors are left uninitialised, for a caller that loads every one of them next.
        """
        entry = Entry(adapter, module_name, {s.name: s for s in specs}, owner=owner)
        for spec in entry.specs.values():
            tensor = torch.empty(spec.shape, device=device, dtype=spec.dtype or dtype)
            if init:
                with torch.no_grad():
                    if spec.init is None:
                        tensor.zero_()
                    else:
                        spec.init(tensor)
            param = nn.Parameter(tensor, requires_grad=spec.trainable)
            _attach(owner, spec.module_path(adapter), param)
            entry.params[spec.name] = param
        self._add(entry)
        return entry

    def adopt(self, module_name: str, adapter: str, params: dict[str, tuple[nn.Parameter, str]]) -> Entry:
        """Take existing parameters (e.g. a copied head in `modules_to_save`) under the store's keys.

        Args:
            params: name -> (parameter, saved-key suffix under `module_name`).
        """
        from dpeft.store.spec import ADAPTER

        specs = {n: ParamSpec(n, tuple(p.shape), (ADAPTER, *suffix.split("."))) for n, (p, suffix) in params.items()}
        entry = Entry(adapter, module_name, specs, {n: p for n, (p, _) in params.items()})
        self._add(entry)
        return entry

    def _add(self, entry: Entry) -> None:
        keys = self._by_key.setdefault(entry.adapter, {})
        for name in entry.specs:
            key = entry.peft_key(name)
            assert key not in keys, f"duplicate adapter key {key} for adapter {entry.adapter}"
            keys[key] = (entry, name)
        self._entries.setdefault(entry.adapter, []).append(entry)

    def remove(self, adapter: str) -> None:
        """Forget every tensor of `adapter` (the caller detaches the modules that held them)."""
        self._entries.pop(adapter, None)
        self._by_key.pop(adapter, None)
        if self._sharded is not None:
            self._sharded.forget(adapter)

    # ---------------------------------------------------------------- forward
    def get(self, entry: Entry) -> dict[str, torch.Tensor]:
        """The full logical tensors of `entry`, differentiable; the hot path of every method layer.

        Under the sharded backend this gathers the entry's bucket (a collective: every rank runs the same forward).
        """
        return self._sharded.get(entry) if entry.sharded else entry.params

    @property
    def collective(self) -> bool:
        """Whether reading full tensors (`get`, `state_dict`) is a collective that every rank must join."""
        return self._sharded is not None

    # ---------------------------------------------------------------- backends
    def shard(self, group=None, bucket_of: Callable[[Entry], int] | None = None) -> None:
        """Switch to the sharded backend in place: each declared tensor keeps only this rank's dim-0 shard.

        Idempotent: entries sharded before are left alone, entries declared since are sharded now. Values are
        taken from rank 0 first, so ranks that initialised differently still agree. Adopted entries (copied
        modules) stay replicated and get their gradients averaged over ranks.

        Args:
            group: The data-parallel process group (default: the whole job).
            bucket_of: Bucket index of an entry; entries of one adapter in one bucket are gathered in one
                collective. Default: the transformer block index in the module name.
        """
        from dpeft.store.sharded import ShardedBackend, block_index

        if self._sharded is None:
            self._sharded = ShardedBackend(group)
        bucket_of = bucket_of or (lambda entry: block_index(entry.module_name))
        todo = [e for entries in self._entries.values() for e in entries if not e.sharded and e.owner is not None]
        self._sharded.shard_entries(todo, bucket_of, _reattach)
        hook = self._sharded.all_reduce_grad_hook()
        for entries in self._entries.values():
            for entry in entries:
                if entry.owner is None and id(entry) not in self._replicated:
                    for param in entry.params.values():
                        self._sharded.broadcast_(param)
                        param.register_post_accumulate_grad_hook(hook)
                    self._replicated.add(id(entry))
        self.backend = "sharded"

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors an optimizer should be built on (local shards under the sharded backend)."""
        return [p for p in self.parameters() if p.requires_grad]

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter's tensors for `torch.distributed.checkpoint`, keyed ``adapter/<name>/<PEFT key>``.

        Sharded tensors are `DTensor`s (``Shard(0)`` over the logical shape), so nothing is gathered and a load
        at another world size reshards; other tensors are plain (replicated) tensors.
        """
        out = {}
        for adapter, keys in self._by_key.items():
            for key, (entry, name) in keys.items():
                sharded = entry.sharded
                out[f"adapter/{adapter}/{key}"] = (
                    self._sharded.dtensor(entry, name) if sharded else entry.params[name].detach()
                )
        return out

    def param_keys(self) -> dict[int, tuple[str, tuple[int, ...], bool]]:
        """id(parameter) -> (checkpoint key, logical shape, sharded) for every tensor of the store."""
        return {
            id(entry.params[name]): (f"adapter/{adapter}/{key}", tuple(entry.specs[name].shape), entry.sharded)
            for adapter, keys in self._by_key.items()
            for key, (entry, name) in keys.items()
        }

    # ---------------------------------------------------------------- inspection
    @property
    def adapters(self) -> list[str]:
        return list(self._entries)

    def entries(self, adapter: str) -> list[Entry]:
        return self._entries.get(adapter, [])

    def keys(self, adapter: str) -> list[str]:
        return list(self._by_key.get(adapter, {}))

    def parameters(self, adapter: str | None = None) -> Iterator[nn.Parameter]:
        """The tensors the optimizer should see (all adapters when `adapter` is None)."""
        for name in [adapter] if adapter is not None else self.adapters:
            for entry in self._entries.get(name, []):
                yield from entry.params.values()

    def set_requires_grad(self, adapter: str, requires_grad: bool) -> None:
        for entry in self._entries.get(adapter, []):
            for name, param in entry.params.items():
                param.requires_grad_(requires_grad and entry.specs[name].trainable)

    # ---------------------------------------------------------------- state
    def state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        """Full tensors of `adapter` under PEFT's saved key names (adapter name stripped)."""
        self._require(adapter)
        return {
            key: self._sharded.full_tensor(entry, name) if entry.sharded else entry.params[name].detach()
            for key, (entry, name) in self._by_key[adapter].items()
        }

    def check_state_dict(self, adapter: str, state_dict: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Raise `ValueError` naming each key or shape of `state_dict` that does not fit `adapter`."""
        self._require(adapter)
        expected = self._by_key[adapter]
        problems = []
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and missing:
            problems.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected keys (not in the adapter built from its config): {_preview(unexpected)}")
        for key, tensor in state_dict.items():
            if key in expected:
                entry, name = expected[key]
                want = tuple(entry.specs[name].shape)
                if tuple(tensor.shape) != want:
                    problems.append(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {want}")
        if problems:
            raise ValueError(
                f"checkpoint does not fit adapter {adapter!r}: "
                + "; ".join(problems)
                + ". Check that the checkpoint was saved from this base model with this adapter config."
            )

    def load_state_dict(
        self, adapter: str, state_dict: dict[str, torch.Tensor], *, strict: bool = True, assign: bool = False
    ) -> None:
        """Copy `state_dict` (PEFT key names) into `adapter`'s tensors; checks everything before changing anything.

        With ``assign=True`` the tensors of `state_dict` become the parameters' storage where dtype and device
        already fit (for freshly read files, which nobody else holds), saving a copy.
        """
        self.check_state_dict(adapter, state_dict, strict=strict)
        expected = self._by_key[adapter]
        with torch.no_grad():
            for key, tensor in state_dict.items():
                entry, name = expected[key]
                param = entry.params[name]
                if entry.sharded:
                    self._sharded.load_full(entry, name, tensor)
                    continue
                if assign and tensor.dtype == param.dtype and tensor.device == param.device and tensor.is_contiguous():
                    param.data = tensor  # adopt the freshly read buffer: no second copy
                else:
                    param.copy_(tensor)

    def _require(self, adapter: str) -> None:
        if adapter not in self._entries:
            raise ValueError(f"adapter {adapter!r} is not loaded; loaded adapters: {self.adapters}")


def _preview(keys: list[str], n: int = 5) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _attach(owner: nn.Module, path: tuple[str, ...], param: nn.Parameter) -> None:
    module = owner
    for part in path[:-1]:
        child = module._modules.get(part)
        if child is None:
            child = _new_holder()
            if isinstance(module, _Holder):  # holds only holders and parameters: no attribute to collide with
                assert part not in module._parameters, f"{part} is both a parameter and a holder"
                module._modules[part] = child
            else:
                module.add_module(part, child)
        module = child
    if isinstance(module, _Holder):
        assert path[-1] not in module._modules, f"{path[-1]} is both a holder and a parameter"
        module._parameters[path[-1]] = param
    else:
        module.register_parameter(path[-1], param)


def _new_holder() -> _Holder:
    """An empty holder, made without `nn.Module.__init__` and its per-attribute checks.

    Loading an adapter makes four holders per adapted layer, and building them the normal way was a fifth of the
    load time; a bare instance with fresh copies of an empty prototype's containers is the same module.
    """
    holder = _Holder.__new__(_Holder)
    holder.__dict__.update({k: type(v)() if isinstance(v, (dict, set)) else v for k, v in _HOLDER_STATE.items()})
    return holder


_HOLDER_STATE = dict(_Holder().__dict__)
assert not any(v for v in _HOLDER_STATE.values() if isinstance(v, (dict, set))), "a new module has empty containers"


def _reattach(entry: Entry, name: str, param: nn.Parameter) -> None:
    """Register `param` (a shard) where `entry`'s tensor `name` was registered."""
    _attach(entry.owner, entry.specs[name].module_path(entry.adapter), param)


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
