"""`ModulesToSaveWrapper`: a module (e.g. a classification head) trained and saved in full, one copy per adapter."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dpeft.model.layer import BASE_ADAPTER, ForwardContext


class ModulesToSaveWrapper(nn.Module):
    """Holds the original module and a trainable copy per adapter, under PEFT's module paths
    (``head.original_module``, ``head.modules_to_save.<adapter>``)."""

    def __init__(self, module: nn.Module, ctx: ForwardContext) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.ctx = ctx
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add(self, adapter: str) -> nn.Module:
        clone = copy.deepcopy(self.original_module)
        for param in clone.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter] = clone
        return clone

    def remove(self, adapter: str) -> None:
        if adapter in self.modules_to_save:
            del self.modules_to_save[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def _module_for(self, name: str | None) -> nn.Module:
        if name is None or name == BASE_ADAPTER or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disable_adapters:
            return self.original_module(x, *args, **kwargs)
        routing = self.ctx.adapter_names
        if routing is None:
            active = next((a for a in self.active_adapters if a in self.modules_to_save), None)
            return self._module_for(active)(x, *args, **kwargs)
        if len(routing) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(routing)} entries but the batch has {x.shape[0]} rows")
        outputs, order = [], []
        for name in dict.fromkeys(routing):
            idx = [i for i, n in enumerate(routing) if n == name]
            outputs.append(self._module_for(name)(x[idx], *args, **kwargs))
            order.extend(idx)
        merged = torch.cat(outputs)
        inverse = torch.empty(len(order), dtype=torch.long, device=merged.device)
        inverse[torch.tensor(order, device=merged.device)] = torch.arange(len(order), device=merged.device)
        return merged.index_select(0, inverse)
