"""Poly on nn.Linear base layers (PEFT supports only those).

Math, for a batch row with task t: the router's logits ``module_logits[t]`` (n_splits * n_skills) become mixing
weights w (n_splits, n_skills): ``sigmoid`` in eval, a relaxed Bernoulli sample (temperature 1) in training, each
split's row normalised to sum 1. Each split q mixes the skills' LoRA pieces, A_q = sum_s w[q, s] A[q, s] with
A[q, s] (in / n_splits, r), B_q = sum_s w[q, s] B[q, s] with B[q, s] (r, out / n_splits); the row's A (in, r)
stacks the A_q along the input features, its B (r, out) the B_q along the output features, and the layer adds
``x A B / r``. Key names and init follow HF PEFT: per layer `poly_lora_A` (kaiming per skill and split, drawn as
(r, d) and transposed), `poly_lora_B` (zeros, or drawn like A with ``init_weights=False``) and the router's
`poly_router.<adapter>.module_logits` (n_tasks, n_splits * n_skills), uniform in +-1e-3. Not mergeable: the
change depends on each row's task.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from dpeft.methods.base import MethodLayer
from dpeft.methods.poly.config import PolyConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec

_EPS = 1e-12  # keeps the normalisation finite when every mixing weight of a split underflows


def _skills_init(n_splits: int, n_skills: int) -> Callable[[torch.Tensor], None]:
    """PEFT's init of a (n_splits, n_skills, d, r) stack: per skill, then split, kaiming on an (r, d) matrix, stored
    transposed (the draws' order and shapes matter for same-seed equality)."""

    def init(t: torch.Tensor) -> None:
        for skill in range(n_skills):
            for split in range(n_splits):
                drawn = torch.empty(t.shape[3], t.shape[2])
                nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
                t[split, skill].copy_(drawn.T)

    return init


def _router_init(t: torch.Tensor) -> None:
    nn.init.uniform_(t, -1e-3, 1e-3)


def mixing_weights(
    logits: torch.Tensor, task_ids: torch.Tensor | None, n_splits: int, n_skills: int, training: bool
) -> torch.Tensor:
    """The (batch, n_splits, n_skills) skill weights of each row from the router's (n_tasks, ...) logits."""
    if task_ids is None:
        raise ValueError(
            "a Poly adapter needs task_ids: pass task_ids=<LongTensor with one task index per batch row> to the "
            "model's forward or generate"
        )
    task_ids = torch.as_tensor(task_ids, device=logits.device)
    if task_ids.numel() and (task_ids.min().item() < 0 or task_ids.max().item() >= logits.shape[0]):
        raise ValueError(
            f"task_ids must lie in [0, {logits.shape[0]}) (n_tasks={logits.shape[0]}); got "
            f"{sorted(set(task_ids.flatten().tolist()))}"
        )
    rows = logits[task_ids].view(-1, n_splits, n_skills)
    # Training samples a relaxed Bernoulli (same draws as PEFT for the same RNG state); eval uses its mean's logit.
    rows = RelaxedBernoulli(temperature=1.0, logits=rows).rsample() if training else torch.sigmoid(rows)
    return rows / (rows.sum(dim=-1, keepdim=True) + _EPS)


class PolyLayer(MethodLayer):
    """One Poly adapter on one linear base layer."""

    can_merge = False
    forward_kwargs = ("task_ids",)

    def __init__(self, handler: BaseHandler, config: PolyConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        inp, out, q, s, r = handler.in_features, handler.out_features, config.n_splits, config.n_skills, config.r
        for what, n in (("in_features", inp), ("out_features", out)):
            if n % q:
                raise ValueError(
                    f"{module_name}: {what}={n} is not divisible by n_splits={q}; choose n_splits that is"
                )
        self.r, self.n_splits, self.n_skills = r, q, s
        # PEFT's order: A, then B, then the router (same seed -> same tensors).
        self.specs = [
            ParamSpec("poly_lora_A", (q, s, inp // q, r), ("poly_lora_A", ADAPTER), _skills_init(q, s)),
            ParamSpec(
                "poly_lora_B",
                (q, s, r, out // q),
                ("poly_lora_B", ADAPTER),
                None if config.init_weights else _skills_init(q, s),
            ),
            ParamSpec(
                "module_logits", (config.n_tasks, q * s), ("poly_router", ADAPTER, "module_logits"), _router_init
            ),
        ]

    def forward(
        self,
        x: torch.Tensor,
        result: torch.Tensor,
        p: dict[str, torch.Tensor],
        training: bool,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        w = mixing_weights(p["module_logits"], task_ids, self.n_splits, self.n_skills, training)
        batch = w.shape[0]
        if x.shape[0] != batch:
            raise ValueError(f"{self.module_name}: task_ids has {batch} entries but the batch has {x.shape[0]} rows")
        a = torch.einsum("bqs,qsdr->bqdr", w, p["poly_lora_A"]).reshape(batch, -1, self.r)
        b = torch.einsum("bqs,qsrd->bqrd", w, p["poly_lora_B"]).transpose(1, 2).reshape(batch, self.r, -1)
        flat = x.reshape(batch, -1, x.shape[-1])  # (batch, tokens, in): also 2-D inputs (one token per row)
        delta = torch.bmm(torch.bmm(flat, a), b).reshape(*x.shape[:-1], b.shape[-1]) / self.r
        return result + delta.to(result.dtype)
