"""Validation shared by the configs of methods that adapt named modules (`target_modules` and friends)."""

from __future__ import annotations


class TargetConfigMixin:
    """Checks and normalises `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`."""

    def normalize_targets(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name, None)
            if isinstance(value, (set, frozenset, tuple)):
                value = sorted(value)
            if value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"{name} must be a list of module names or a regex string, got {type(value).__name__}")
            if isinstance(value, list):
                bad = [v for v in value if not isinstance(v, str)]
                if bad:
                    raise TypeError(f"{name} must hold strings; got {bad!r}")
                value = list(dict.fromkeys(value))
            setattr(self, name, value)
        layers = getattr(self, "layers_to_transform", None)
        if (
            layers is not None
            and getattr(self, "target_modules", None) is not None
            and isinstance(self.target_modules, str)
        ):
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        pattern = getattr(self, "layers_pattern", None)
        if pattern and layers is None:
            raise ValueError("layers_pattern only works together with layers_to_transform")
        modules_to_save = getattr(self, "modules_to_save", None)
        if isinstance(modules_to_save, (set, tuple)):
            self.modules_to_save = list(modules_to_save)
