"""`AdapterStore`: the single owner of every adapter tensor of a model.

Method layers declare `ParamSpec`s at injection and ask for their tensors in forward; where those tensors live
(plain parameters, shards, DTensors) is the backend's business. Keys are HF PEFT's saved key names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dpeft.store.fsdp_view import full_value, load_full_into, refuse_foreign_fsdp
from dpeft.store.holders import attach as _attach
from dpeft.store.integrity import verify_full_state
from dpeft.store.projection import project_reads
from dpeft.store.spec import ADAPTER, ParamSpec

PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
"""Saved-key prefix of model-level (shared) tensors: PEFT keeps them on the tuner, e.g. ``base_model.vera_A``."""


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
    #: True for a model-level entry shared by every layer of the adapter (``declare(..., shared=True)``).
    shared: bool = False
    #: The shared entry whose tensors this layer's entry also sees in `AdapterStore.get` (see `link`).
    link: Entry | None = field(default=None, repr=False)
    #: Further modules the tensors are registered under (layers that see a shared entry, as PEFT registers them).
    aliases: list[nn.Module] = field(default_factory=list, repr=False)
    #: Whether a spec of this entry has a `ParamSpec.project` (checked on every read, so kept as a flag).
    projected: bool = False

    def peft_key(self, name: str) -> str:
        if self.shared:
            return f"{SHARED_PREFIX}{self.specs[name].save_suffix}"
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
        self._fsdp = None  # the FsdpView once dpeft.dist.fsdp.apply_fsdp wrapped the model (the fsdp2 backend)
        self._deepspeed = None  # the DeepSpeedView once dpeft.dist.deepspeed.apply_deepspeed wrapped the model
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
        shared: bool = False,
    ) -> Entry:
        """Allocate the tensors of `specs` for `adapter`, registered under `owner` at PEFT's module paths.

        With ``init=False`` the tensors are left uninitialised, for a caller that loads every one of them next
        (non-persistent tensors, which no checkpoint holds, are initialised all the same). ``shared=True`` declares
        a model-level entry (`owner` is the tuner, saved keys are ``base_model.<path>``); `link` gives its tensors to
        the layers that use them.
        """
        if self._deepspeed is not None:  # DeepSpeed partitions and optimizes only what it was given at initialize
            raise ValueError(
                f"cannot add adapter {adapter!r} after DeepSpeed wrapped the model; add every adapter before "
                "apply_deepspeed (or accelerator.prepare)"
            )
        entry = Entry(adapter, module_name, {s.name: s for s in specs}, owner=owner, shared=shared)
        for spec in entry.specs.values():
            tensor = torch.empty(spec.shape, device=device, dtype=spec.dtype or dtype)
            if init or not spec.persistent:
                with torch.no_grad():
                    if spec.init is None:
                        tensor.zero_()
                    else:
                        spec.init(tensor)
            param = nn.Parameter(tensor, requires_grad=spec.trainable and tensor.is_floating_point())
            if spec.attach:  # spec.module_path(adapter), as a list: a tuple of a generator costs more than the rest
                _attach(owner, [adapter if part == ADAPTER else part for part in spec.path], param)
            entry.params[spec.name] = param
        self._add(entry)
        return entry

    def link(self, entry: Entry, shared: Entry, owner: nn.Module) -> None:
        """Let `entry` (one layer's tensors) see the tensors of the model-level entry `shared` in `get`.

        The shared tensors are also registered under `owner` (the layer) at their module paths, the way HF PEFT's
        layers hold references to the tuner's shared dicts, so module paths and `state_dict` keys match PEFT's.
        They stay one tensor, saved once under the shared key.
        """
        assert shared.shared and not set(shared.specs) & set(entry.specs), "shared and layer names must differ"
        entry.link = shared
        keys = self._by_key.setdefault(entry.adapter, {})
        for name, param in shared.params.items():
            spec = shared.specs[name]
            _attach(owner, spec.module_path(shared.adapter), param)
            if spec.layer_copies and spec.persistent:
                keys[f"{PEFT_PREFIX}{entry.module_name}.{spec.save_suffix}"] = (shared, name)
        shared.aliases.append(owner)

    def adopt(self, module_name: str, adapter: str, params: dict[str, tuple[nn.Parameter, str]]) -> Entry:
        """Take existing parameters (e.g. a copied head in `modules_to_save`) under the store's keys.

        Args:
            params: name -> (parameter, saved-key suffix under `module_name`).
        """
        specs = {n: ParamSpec(n, tuple(p.shape), (ADAPTER, *suffix.split("."))) for n, (p, suffix) in params.items()}
        entry = Entry(adapter, module_name, specs, {n: p for n, (p, _) in params.items()})
        self._add(entry)
        return entry

    def _add(self, entry: Entry) -> None:
        entry.projected = any(spec.project is not None for spec in entry.specs.values())
        keys = self._by_key.setdefault(entry.adapter, {})
        for name, spec in entry.specs.items():
            if not spec.persistent:
                continue  # neither saved nor loaded
            key = entry.peft_key(name)
            assert key not in keys, f"duplicate adapter key {key} for adapter {entry.adapter}"
            keys[key] = (entry, name)
        self._entries.setdefault(entry.adapter, []).append(entry)

    def remove(self, adapter: str) -> None:
        """Forget every tensor of `adapter` (the caller detaches the modules that held them)."""
        removed = self._entries.pop(adapter, [])
        self._by_key.pop(adapter, None)
        if self._sharded is not None:
            self._sharded.forget(adapter)
        if self._fsdp is not None:
            for entry in removed:
                self._fsdp.forget(entry)

    # ---------------------------------------------------------------- forward
    def get(self, entry: Entry) -> dict[str, torch.Tensor]:
        """The full logical tensors of `entry`, differentiable; the hot path of every method layer.

        Under the sharded backend this gathers the entry's bucket (a collective: every rank runs the same forward).
        A layer entry linked to a shared entry gets the shared tensors too, under their own names.
        """
        if entry.sharded:
            own = self._sharded.get(entry)
        else:  # under fsdp2: the tensors FSDP2 registered now (unsharded inside a wrapped module's forward)
            own = entry.params if self._fsdp is None else self._fsdp.get(entry)
        if entry.projected:
            own = project_reads(self, entry, own)
        return own if entry.link is None else {**own, **self.get(entry.link)}

    def gather(self, entry: Entry, name: str, local: torch.Tensor | None = None) -> torch.Tensor:
        """The full (logical) value of tensor `name` of `entry`, detached; or, given `local`, the full tensor of
        which `local` is this rank's part, shaped like that tensor's local parameter (its gradient, or a statistic
        kept per element). Under the sharded backend this is a collective that every rank must join; under the
        deepspeed backend `local` must already have the full shape (`ValueError` otherwise)."""
        if self._deepspeed is not None:
            if local is None:
                return self._deepspeed.full_tensor(entry.params[name])
            _check_full_shaped(entry, name, local)  # ZeRO's partitions are flat: no row layout for per-rank values
        if not entry.sharded:
            return full_value(entry.params[name] if local is None else local)  # DTensor under fsdp2: gathered
        return self._sharded.full_tensor(entry, name, local)

    def write(self, entry: Entry, name: str, value: torch.Tensor) -> None:
        """Set tensor `name` of `entry` from its full (logical) value; each rank keeps its own part."""
        with torch.no_grad():
            if entry.sharded:
                self._sharded.load_full(entry, name, value)
            elif self._deepspeed is not None:
                self._deepspeed.load_full(entry.params[name], value)
            else:
                load_full_into(entry.params[name], value)

    @property
    def collective(self) -> bool:
        """Whether reading full tensors (`get`, `state_dict`) is a collective that every rank must join."""
        return self._sharded is not None or self._fsdp is not None or self._deepspeed is not None

    def use_deepspeed(self, view) -> None:
        """Switch to the deepspeed backend: `view` (a `DeepSpeedView`, made by `dpeft.dist.deepspeed`) reads and
        writes the tensors DeepSpeed ZeRO partitions; the entries' params are DeepSpeed's parameters."""
        if self._sharded is not None or self._fsdp is not None:
            raise ValueError(f"this store already uses the {self.backend!r} backend; build the model again")
        self._deepspeed = view
        self.backend = "deepspeed"

    def load_sharded(self, state: dict[str, torch.Tensor]) -> None:
        """Write back tensors read into `sharded_state_dict()`'s layout where that layout holds copies (deepspeed:
        rows cut from ZeRO's flat partitions); a no-op where it holds the tensors themselves."""
        if self._deepspeed is None:
            return
        for adapter, keys in self._by_key.items():
            for key, (entry, name) in keys.items():
                tensor = state.get(f"adapter/{adapter}/{key}")
                if tensor is not None:
                    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                    self._deepspeed.load_rows(entry.params[name], local, tuple(entry.specs[name].shape))

    def use_fsdp(self, view) -> None:
        """Switch to the fsdp2 backend: `view` (an `FsdpView`, made by `dpeft.dist.fsdp.apply_fsdp`) says where
        FSDP2 registered each entry's tensors; the entries' params are its sharded `DTensor` parameters."""
        if self._sharded is not None:
            raise ValueError("this store is already sharded by the 'sharded' backend; build the model again for fsdp2")
        self._fsdp = view
        self.backend = "fsdp2"

    def localize(self) -> None:
        """Make the tensors full local parameters again where a backend wrapped the whole model (fsdp2): the model
        is unwrapped and every rank holds full values (a collective). A no-op for the other backends."""
        if self._fsdp is None:
            return
        self._fsdp.localize()
        self._fsdp.repoint([e for entries in self._entries.values() for e in entries])
        self._fsdp = None
        self.backend = "local"

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
                if self._deepspeed is not None:  # rows cut from ZeRO's partitions (see `load_sharded`)
                    param, shape = entry.params[name], tuple(entry.specs[name].shape)
                    out[f"adapter/{adapter}/{key}"] = self._deepspeed.dtensor(param, shape)
                    continue
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

    def buffer_ids(self) -> set[int]:
        """ids of the tensors PEFT keeps as buffers (`ParamSpec.buffer`), which parameter counts leave out."""
        return {
            id(entry.params[name])
            for entries in self._entries.values()
            for entry in entries
            for name, spec in entry.specs.items()
            if spec.buffer
        }

    def set_requires_grad(self, adapter: str, requires_grad: bool) -> None:
        for entry in self._entries.get(adapter, []):
            for name, param in entry.params.items():
                param.requires_grad_(requires_grad and entry.specs[name].trainable)

    # ---------------------------------------------------------------- state
    def state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        """Full tensors of `adapter` under PEFT's saved key names (adapter name stripped)."""
        self._require(adapter)
        refuse_foreign_fsdp(self)  # tensors a wrapper replaced behind the store's back would save stale values
        state, seen = {}, set()
        for key, (entry, name) in self._by_key[adapter].items():
            tensor = self.gather(entry, name)
            # A shared tensor saved once per layer too (`ParamSpec.layer_copies`): files cannot hold one tensor twice.
            ptr = (tensor.device, tensor.untyped_storage().data_ptr())
            state[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor
            seen.add(ptr)
        # Nothing leaves the store unchecked: every save path (save_pretrained, merge, export) starts here.
        verify_full_state(adapter, state, self._live(adapter))
        return state

    def _live(self, adapter: str) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
        """PEFT key -> (logical shape, the tensor as this rank holds it: full, shard `DTensor` or `DTensor`)."""
        return {
            key: (
                tuple(entry.specs[name].shape),
                self._sharded.dtensor(entry, name) if entry.sharded else self._held(entry.params[name]),
            )
            for key, (entry, name) in self._by_key[adapter].items()
        }

    def _held(self, param: nn.Parameter) -> torch.Tensor:
        return param.detach() if self._deepspeed is None else self._deepspeed.live(param)

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
                plain = not entry.sharded and self._fsdp is None and self._deepspeed is None
                if plain and assign and tensor.dtype == param.dtype and tensor.device == param.device:
                    if tensor.is_contiguous():
                        param.data = tensor  # adopt the freshly read buffer: no second copy
                        continue
                self.write(entry, name, tensor)

    def _require(self, adapter: str) -> None:
        if adapter not in self._entries:
            raise ValueError(f"adapter {adapter!r} is not loaded; loaded adapters: {self.adapters}")


def _check_full_shaped(entry: Entry, name: str, local: torch.Tensor) -> None:
    """Under DeepSpeed a per-element value must be kept in the logical shape on every rank: ZeRO-3 holds a flat
    slice of each tensor (the parameter itself is shape [0] outside the forward), which no value can be shaped like."""
    shape = tuple(entry.specs[name].shape)
    if tuple(local.shape) != shape:
        raise ValueError(
            f"{entry.module_name}.{name}: under the deepspeed backend a per-rank value is gathered only in the "
            f"tensor's full shape {shape} (ZeRO partitions are flat slices), got shape {tuple(local.shape)}; "
            "compute it from store.gather(entry, name) instead of the partitioned parameter"
        )


def _preview(keys: list[str], n: int = 5) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _reattach(entry: Entry, name: str, param: nn.Parameter) -> None:
    """Register `param` (a shard) where `entry`'s tensor `name` was registered (and where it is aliased)."""
    if not entry.specs[name].attach:
        return
    path = entry.specs[name].module_path(entry.adapter)
    for owner in [entry.owner, *entry.aliases]:
        _attach(owner, path, param)
