"""`AdaptedLayer`: the one wrapper that puts adapters of any method on a base layer.

It calls the base layer, hands each active adapter its tensors from the store, casts dtypes, routes rows of a
mixed-adapter batch, and merges/unmerges through the method's weight math. Methods only supply the math.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dpeft.methods import MethodLayer
from dpeft.quant import BaseHandler
from dpeft.store import AdapterStore, Entry, detach_holders
from dpeft.store.holders import init_module_state

BASE_ADAPTER = "__base__"


class ForwardContext:
    """State shared by every adapted layer of one model for the duration of a forward call."""

    def __init__(self) -> None:
        self.adapter_names: list[str] | None = None
        # Per-call keyword arguments the methods read (`MethodLayer.forward_kwargs`), set by `PeftModel.forward`.
        self.extras: dict[str, object] = {}


class AdaptedLayer(nn.Module):
    """A base layer with adapters on it. `base_layer` keeps PEFT's module path (``q_proj.base_layer.weight``)."""

    def __init__(self, base_layer: nn.Module, handler: BaseHandler, store: AdapterStore, ctx: ForwardContext) -> None:
        # nn.Module's attributes and ours straight into __dict__: nn.Module.__init__ and __setattr__ cost ~10x more
        # per attribute, and injection builds one of these per adapted layer on the load path.
        init_module_state(self)
        self._modules["base_layer"] = base_layer
        self.__dict__.update(
            handler=handler,
            store=store,
            ctx=ctx,
            disable_adapters=False,
            methods={},
            entries={},
            active_adapters=[],
            merged_adapters=[],
        )
        self.methods: dict[str, MethodLayer]
        self.entries: dict[str, Entry]
        self.active_adapters: list[str]
        self.merged_adapters: list[str]

    def train(self, mode: bool = True) -> AdaptedLayer:
        """`nn.Module.train` without its per-module ``__setattr__`` (an ``eval()`` after a load visits every layer)."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.__dict__["training"] = mode
        for child in self._modules.values():
            if child is not None:
                child.train(mode)
        return self

    # ------------------------------------------------------------------ adapters
    def add(self, adapter: str, method: MethodLayer, entry: Entry) -> None:
        self.methods[adapter] = method
        self.entries[adapter] = entry

    def remove(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            self.unmerge([adapter])
        self.methods.pop(adapter, None)
        self.entries.pop(adapter, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter]
        detach_holders(self, adapter)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_scale(self, adapter: str, scale: float) -> None:
        """PEFT's layer-level ``set_scale``: the scale of `adapter` on this layer, for methods that have one.

        A layer without `adapter` ignores the call, as in PEFT. Unlike PEFT, a merged adapter is refused (its
        merged weight was made with the old scale and unmerging with the new one would not restore the base).
        """
        method = self.methods.get(adapter)
        if method is None:
            return
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged into {method.module_name}; unmerge it before set_scale")
        method.set_scale(scale)

    # ------------------------------------------------------------------ forward
    def _apply_adapter(
        self,
        name: str,
        x: torch.Tensor,
        result: torch.Tensor,
        rows: torch.Tensor | None = None,
        p: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        p = p if p is not None else self.store.get(self.entries[name])
        if x.is_floating_point():
            x = x.to(_adapter_dtype(p))
        method = self.methods[name]
        if not method.forward_kwargs:
            return method.forward(x, result, p, self.training)
        batch = len(self.ctx.adapter_names or ())
        extras = {k: _rows_of(self.ctx.extras.get(k), rows, batch) for k in method.forward_kwargs}
        return method.forward(x, result, p, self.training, **extras)

    def _base_input(
        self, x: torch.Tensor, names: list[str], tensors: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """The base layer's input: `x` through the `transform_input` of each listed adapter that has one (its
        tensors from `tensors` when the caller already read them: one read, one gather, per adapter and forward)."""
        for name in names:
            method = self.methods.get(name)
            if method is None or not method.transforms_input:
                continue
            p = tensors[name] if tensors is not None else self.store.get(self.entries[name])
            x = method.transform_input(x.to(_adapter_dtype(p)), p).to(x.dtype)
        return x

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        routing = self.ctx.adapter_names
        if routing is not None:
            return self._mixed_forward(x, routing, args, kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        if len(self.active_adapters) == 1 and not args and not kwargs and self._plain_base_call():
            fused = self._fused(self.active_adapters[0], x)
            if fused is not None:
                return fused
        names = self.active_adapters
        chain = [n for n in names if n in self.methods and self.methods[n].composes_through_weight]
        if len(chain) > 1:  # e.g. several BOFT adapters: one rotation after the other, not a sum of changes
            names = [n for n in names if n not in chain]
        tensors = {n: self.store.get(self.entries[n]) for n in names if n in self.methods}
        result = self.base_layer(self._base_input(x, names, tensors), *args, **kwargs)
        dtype = result.dtype
        if len(chain) > 1:
            result = self._apply_chain(chain, x, result)
        for name in tensors:
            result = self._apply_adapter(name, x, result, p=tensors[name])
        return result if result.dtype == dtype else result.to(dtype)

    def _apply_chain(self, chain: list[str], x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The output of adapters that compose through the weight (`MethodLayer.composes_through_weight`)."""
        pairs = [(self.methods[n], self.store.get(self.entries[n])) for n in chain]
        x = x.to(_adapter_dtype(pairs[0][1])) if x.is_floating_point() else x
        return pairs[0][0].chained_forward(x, result, pairs, self.training)

    def _plain_base_call(self) -> bool:
        """Whether calling the base layer is just its forward (no hooks that shard, gather or observe it)."""
        base = self.base_layer
        return not (
            base._forward_hooks
            or base._forward_pre_hooks
            or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks
        )

    def _fused(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The method's fused base + adapter output for the single active adapter, if it has one here."""
        method = self.methods.get(name)
        # The fused autograd functions mix dtypes in in-place GEMMs, which autocast does not cover.
        if method is None or method.transforms_input or torch.is_autocast_enabled(x.device.type):
            return None
        return method.fused_forward(x, self.store.get(self.entries[name]), self.training)

    def _mixed_forward(self, x: torch.Tensor, routing: list[str], args, kwargs) -> torch.Tensor:
        if self.merged_adapters:
            raise ValueError("cannot use adapter_names with merged adapters; unmerge them first")
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        if len(routing) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(routing)} entries but the batch has {x.shape[0]} rows")
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(routing):
            rows.setdefault(name, []).append(i)
        # A fixed order, and a store read even for adapters without rows here: under a sharded store reads are
        # collectives, so every rank must make the same ones whatever its rows are (locally a read is free).
        # One read per adapter, used for both the input transform and the output.
        for name in self.methods:
            p = self.store.get(self.entries[name])
            idx = rows.get(name)
            if idx is None:
                continue
            index = torch.tensor(idx, device=result.device)
            x_rows = x.index_select(0, index)
            if self.methods[name].transforms_input:
                sub_result = self.base_layer(self._base_input(x_rows, [name], {name: p}), *args, **kwargs)
            else:
                sub_result = result.index_select(0, index)
            sub = self._apply_adapter(name, x_rows, sub_result, index, p=p)
            result = result.to(sub.dtype).index_copy(0, index, sub)
        return result if result.dtype == dtype else result.to(dtype)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The change `adapter` makes to the base weight, in the base layer's own layout."""
        return self.handler.stored_layout(self.methods[adapter].delta_weight(self.store.get(self.entries[adapter])))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight; `safe_merge` checks for NaN/inf first."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for name in names:
            if name in self.merged_adapters or name not in self.methods:
                continue
            method, p = self.methods[name], self.store.get(self.entries[name])
            if not method.can_merge:
                raise ValueError(f"adapter {name!r} on {method.module_name} cannot be merged")
            weight = method.merge_weight(self.handler.weight().detach(), p)
            bias = method.merged_bias(self.handler.bias, p, +1)
            if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(
                    f"NaNs detected in the merged weights of {method.module_name} (adapter {name!r}); "
                    "the adapter seems to be broken"
                )
            self._write_base(weight, bias)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Undo merges, last merged first (all merged adapters by default)."""
        names = set(adapter_names) if adapter_names is not None else set(self.merged_adapters)
        for name in reversed(list(self.merged_adapters)):
            if name not in names:
                continue
            method, p = self.methods[name], self.store.get(self.entries[name])
            self._write_base(
                method.unmerge_weight(self.handler.weight().detach(), p), method.merged_bias(self.handler.bias, p, -1)
            )
            self.merged_adapters.remove(name)

    def _write_base(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.handler.set_weight(weight)
        if bias is not None and bias is not self.handler.bias:
            self.handler.bias.data.copy_(bias)

    def extra_repr(self) -> str:
        return f"adapters={list(self.methods)}, active={self.active_adapters}, merged={self.merged_adapters}"


def check_mergeable(layers: Iterable[AdaptedLayer], adapter_names: Iterable[str] | None = None) -> None:
    """Raise the `merge` error before any layer changes when one of the adapters to merge cannot be merged."""
    names = None if adapter_names is None else set(adapter_names)
    for layer in layers:
        for name in layer.active_adapters if names is None else names:
            method = layer.methods.get(name)
            if method is not None and not method.can_merge and name not in layer.merged_adapters:
                raise ValueError(
                    f"adapter {name!r} on {method.module_name} cannot be merged ({type(method).__name__} has no "
                    "merged form); keep the PeftModel for inference, or use unload() to get the base model back"
                )


def _rows_of(value: object, rows: torch.Tensor | None, batch: int) -> object:
    """A per-call extra for the rows of one adapter in a mixed batch: a tensor with one entry per row is cut."""
    if rows is None or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return value
    return value.index_select(0, rows.to(value.device))


def _adapter_dtype(p: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype an adapter computes in: that of its tensors (float32 on half-precision bases by default)."""
    return next(iter(p.values())).dtype
