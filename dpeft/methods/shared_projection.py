"""PEFT's rule for methods with frozen random projections shared by every layer (VeRA, RandLoRA): all adapters of
one model draw them from one `projection_prng_key`, agree on `save_projection`, and use the first adapter's tensors.

PEFT keeps one dict of projections on its tuner: the first adapter creates them, later adapters get references to
the same tensors (refused when those are too small for them). dpeft declares each adapter's projections in the
store like any tensor, sized for its own layers, then fills them from the first adapter's: a prefix slice of each
tensor, which is what a layer of the later adapter reads from PEFT's larger tensors anyway.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dpeft.config import PeftConfig
from dpeft.methods.hooks import ModelHooks


class SharedProjectionHooks(ModelHooks):
    """Model-level rules of a shared-projection method; subclasses name the method and its shared tensors."""

    #: The method's name in messages, e.g. ``"VeRA"``.
    label: ClassVar[str] = ""

    @classmethod
    def check_adapters(cls, configs: dict[str, PeftConfig]) -> None:
        *others, (new_name, new) = configs.items()
        for name, config in others:
            if config.projection_prng_key != new.projection_prng_key:
                raise ValueError(
                    f"{cls.label} PRNG initialisation key must be the same for all adapters of a model (they share "
                    f"one set of projections): adapter {new_name!r} has projection_prng_key={new.projection_prng_key} "
                    f"but adapter {name!r} has {config.projection_prng_key}; set "
                    f"projection_prng_key={config.projection_prng_key}"
                )
        saved = sorted({config.save_projection for config in configs.values()})
        if len(saved) > 1:
            first = others[0][1].save_projection
            raise ValueError(
                f"{cls.label} projection weights must be saved for all adapters or none, but got multiple different "
                f"values: {saved}; set save_projection={first} for adapter {new_name!r}"
            )

    def __init__(self, tuner: Any, adapter_name: str, config: PeftConfig) -> None:
        super().__init__(tuner, adapter_name, config)
        first = next(
            (n for n, c in tuner.peft_config.items() if c.peft_type == config.peft_type and n != adapter_name), None
        )
        if first is not None:
            self._share_projections(first)

    def _share_projections(self, first: str) -> None:
        """Fill this adapter's projections with prefix slices of adapter `first`'s, or refuse as PEFT does."""
        store, config = self.tuner.store, self.config
        first_r = self.tuner.peft_config[first].r
        if config.r != first_r:
            raise ValueError(
                f"{self.label} adapter {self.adapter_name!r} has r={config.r} but the first {self.label} adapter "
                f"{first!r} has r={first_r}; adapters of one model share one set of projections, so use r={first_r} "
                "(or load the adapter into a model of its own)"
            )
        mine = next(e for e in store.entries(self.adapter_name) if e.shared)
        theirs = next(e for e in store.entries(first) if e.shared)
        for name, spec in mine.specs.items():
            have = tuple(theirs.specs[name].shape)
            if any(want > size for want, size in zip(spec.shape, have)):
                raise ValueError(
                    f"{name} of the first {self.label} adapter {first!r} has shape {have} but adapter "
                    f"{self.adapter_name!r} needs {tuple(spec.shape)}: it targets larger layers, and adapters of one "
                    f"model share one set of projections; add {self.adapter_name!r} first, or target layers no larger "
                    f"than {first!r}'s"
                )
            value = store.gather(theirs, name)
            store.write(mine, name, value[tuple(slice(0, n) for n in spec.shape)])
