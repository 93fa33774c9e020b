"""Dynamic loss scaling for fp16, with the skip decision agreed by every rank.

A per-rank `torch.amp.GradScaler` would look only at a rank's own gradient shards under the sharded backend,
so ranks could disagree on skipping a step; here the "found inf" flag is reduced over ranks first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LossScaler:
    """Scale the loss up before backward and the gradients down before the step (a no-op when disabled).

    Args:
        enabled: Whether to scale (fp16 mixed precision).
        init_scale: First scale.
        growth_interval: Double the scale after this many steps without overflow.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self._good_steps = 0

    def unscale(
        self, params: list[nn.Parameter], sharded: bool, all_reduce_mean: Callable[[float], float], world: int
    ) -> bool:
        """Divide gradients by the scale; returns False (and halves the scale) when any rank saw inf/nan."""
        if not self.enabled:
            return True
        # This rank's part of each gradient (the local shard of an fsdp2 DTensor gradient).
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
        bad = float(not all(bool(torch.isfinite(g).all()) for g in grads))
        if world > 1:
            bad = all_reduce_mean(bad)
        if bad > 0:
            self.scale /= 2.0
            self._good_steps = 0
            return False
        for g in grads:
            g.div_(self.scale)
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True
