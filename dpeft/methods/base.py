"""What a method provides for one adapter on one base layer: parameter specs, forward math, delta weight.

A `MethodLayer` is a plain object, not a module: its tensors belong to the store and reach `forward` as the
`p` dict; the wrapping layer (`dpeft.model.layer.AdaptedLayer`) does base-layer calls, dtype plumbing,
adapter selection and merging, once for all methods.
"""

from __future__ import annotations

import torch

from dpeft.config import PeftConfig
from dpeft.quant import BaseHandler
from dpeft.store import ParamSpec


class MethodLayer:
    """One adapter of one method on one base layer.

    Subclasses set `specs` in `__init__` and implement `forward`; methods that can merge implement
    `delta_weight` (additive) or override `merge_weight`/`unmerge_weight` (e.g. DoRA's rescaling).

    Args:
        handler: The base layer, as the shared handler presents it.
        config: This adapter's config.
        module_name: The base layer's name in the model (used for rank/alpha patterns and messages).
    """

    #: Whether `merge_weight` exists for this layer.
    can_merge: bool = True

    def __init__(self, handler: BaseHandler, config: PeftConfig, module_name: str) -> None:
        self.handler = handler
        self.config = config
        self.module_name = module_name
        self.specs: list[ParamSpec] = []

    def after_allocation(self, p: dict[str, torch.Tensor]) -> None:
        """Initialise tensors that depend on others (e.g. DoRA's magnitude); called once after fresh allocation."""

    #: Whether `transform_input` changes the input of the base layer (the wrapper then calls the base layer on the
    #: transformed input, also per adapter group in a mixed batch).
    transforms_input: bool = False

    def transform_input(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The input the base layer sees with this adapter active (e.g. IA3 on feedforward layers scales it)."""
        return x

    #: Per-call keyword arguments of the model's forward this method reads (e.g. ``("task_ids",)``); the wrapper
    #: passes each to `forward` as a keyword argument (None when the call did not give it; in a mixed-adapter
    #: batch, tensors with one entry per batch row are cut to this adapter's rows). The method's registration
    #: lists the same names (``register_method(..., forward_kwargs=...)``) so that `PeftModel` takes them out of
    #: the call instead of passing them to the base model.
    forward_kwargs: tuple[str, ...] = ()

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        """Return the layer output with this adapter applied, given the input and the output so far (methods with
        `forward_kwargs` also take those as keyword arguments)."""
        raise NotImplementedError

    #: Whether several active adapters of this kind on one layer compose through the weight, as sequential merges in
    #: the active order (PEFT's BOFT and HRA multiply their rotations): the wrapper then gets their joint output
    #: from `chained_forward` of the first of them instead of calling each one's `forward`.
    composes_through_weight: bool = False

    def chained_forward(
        self,
        x: torch.Tensor,
        result: torch.Tensor,
        chain: list[tuple[MethodLayer, dict[str, torch.Tensor]]],
        training: bool,
    ) -> torch.Tensor:
        """`result` (the base output) with every (method layer, tensors) of `chain` applied, in that order."""
        raise NotImplementedError(f"{type(self).__name__} does not compose through the weight")

    def fused_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor | None:
        """Base output and this adapter's change computed together, or None where the method has no fused form.

        The wrapper tries it (instead of calling the base layer, then `forward`) when this adapter is the only
        active one and the base layer's call has no hooks or extra arguments; the result must equal that path up to
        float rounding. It is a speed path only: returning None is always correct.
        """
        return None

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The additive change to the base weight, in (out, in, ...) orientation."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def merge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merged weight, (out, in, ...), from the current weight; `state` may keep what unmerging needs."""
        return weight + self.delta_weight(p).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return weight - self.delta_weight(p).to(weight.dtype)

    def set_scale(self, scale: float) -> None:
        """Set this adapter's output scale on this layer (PEFT's layer-level ``set_scale``, e.g. SHiRA's).

        Raises:
            ValueError: for a method without an adjustable scale (the default).
        """
        raise ValueError(f"{type(self).__name__} has no adapter scale: set_scale is not supported for this method")

    def merged_bias(self, bias: torch.Tensor | None, p: dict[str, torch.Tensor], sign: int) -> torch.Tensor | None:
        """The base bias after merging (``sign=1``) or unmerging (``sign=-1``); unchanged by default."""
        return bias
