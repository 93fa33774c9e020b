"""Ray launchers: `train` (a run config on Ray Train workers) and `evaluate_adapters` (many adapters, one base).

Importing this package does not import ray; each function imports it when called. ``import dpeft`` does not import
this package. Nothing outside ``dpeft.ray`` imports ray.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly (it imports no ray at module level) so that the function, not the submodule of the same name,
# is `dpeft.ray.train`: a later `import dpeft.ray.train` (Ray workers unpickling the loop do one) then leaves the
# package attribute alone.
from dpeft.ray.train import train

# name -> module holding it; loaded on first access.
_LAZY = {"evaluate_adapters": "dpeft.ray.evaluate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpeft.ray' has no attribute {name!r}")


__all__ = ["evaluate_adapters", "train"]
