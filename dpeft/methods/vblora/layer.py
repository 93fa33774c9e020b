"""VB-LoRA on linear base layers (nn.Linear and transformers' Conv1D).

Math, with a shared bank V (num_vectors, L) and L = vector_length:  delta y = B (A x), where every length-L
sub-vector of A (r, in) and B (out, r) is softmax(top-k logits) . V[top-k indices] of its own logits row:
`vblora_logits_A` (r, in / L, num_vectors), `vblora_logits_B` (out / L, r, num_vectors). The bank is a model-level
store entry, trainable, saved once as ``base_model.vblora_vector_bank``.

Init follows HF PEFT's order exactly: PEFT re-draws the whole bank (uniform) before each layer's logits (normal), so
the bank it keeps is the last layer's draw; here each layer draws its bank values first and `after_allocation`
writes them, so the same seed gives PEFT's tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpeft.methods.base import MethodLayer
from dpeft.methods.vblora.config import VBLoRAConfig
from dpeft.quant import BaseHandler
from dpeft.store import ADAPTER, ParamSpec

BANK = "vblora_vector_bank"


def shared_specs(config: VBLoRAConfig, handlers: dict[str, BaseHandler]) -> list[ParamSpec]:
    """The adapter's vector bank; its values are drawn by the layers (see the module docstring)."""
    if not any(h.kind == "linear" for h in handlers.values()):
        return []  # no linear target: the injector reports the layer types
    return [ParamSpec(BANK, (config.num_vectors, config.vector_length), (BANK, ADAPTER))]


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., L): each row of `logits` (..., num_vectors) as the softmax-weighted sum of its top-k bank vectors."""
    top, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


class VBLoRALayer(MethodLayer):
    """Per-layer VB-LoRA logits; the shared bank arrives in `p` as ``vblora_vector_bank``."""

    def __init__(self, handler: BaseHandler, config: VBLoRAConfig, module_name: str) -> None:
        super().__init__(handler, config, module_name)
        out_f, in_f, length = handler.out_features, handler.in_features, config.vector_length
        for what, n in (("in_features", in_f), ("out_features", out_f)):
            if n % length:
                raise ValueError(
                    f"{module_name}: `{what}` {n} must be divisible by `vector_length` {length}; choose a "
                    "vector_length that divides every target's in and out features, or exclude this module"
                )
        self.topk, self.dropout = config.topk, config.vblora_dropout
        std, bound = config.init_logits_std, config.init_vector_bank_bound
        self._bank_draw: torch.Tensor | None = None

        def init_a(t: torch.Tensor) -> None:
            # PEFT draws the bank before each layer's logits: take that draw here, `after_allocation` stores it.
            self._bank_draw = torch.empty(config.num_vectors, length).uniform_(-bound, bound)
            t.copy_(torch.empty(t.shape).normal_(0, std))

        def init_b(t: torch.Tensor) -> None:
            t.copy_(torch.empty(t.shape).normal_(0, std))

        r, n = config.r, config.num_vectors
        self.specs = [
            ParamSpec("vblora_logits_A", (r, in_f // length, n), ("vblora_logits_A", ADAPTER), init_a),
            ParamSpec("vblora_logits_B", (out_f // length, r, n), ("vblora_logits_B", ADAPTER), init_b),
        ]

    def after_allocation(self, p: dict[str, torch.Tensor]) -> None:
        if self._bank_draw is not None:
            with torch.no_grad():
                p[BANK].copy_(self._bank_draw)
            self._bank_draw = None

    def factors(self, p: dict[str, torch.Tensor], training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The LoRA factors A (r, in) and B (out, r) the logits select from the bank."""
        logits_a, logits_b = p["vblora_logits_A"], p["vblora_logits_B"]
        if training and logits_a[0, 0].isinf().any():
            raise RuntimeError(
                "Found infinity values in VB-LoRA logits: an adapter saved with save_only_topk_weights=True can be "
                "used for inference only; train from a checkpoint saved with save_only_topk_weights=False."
            )
        bank = p[BANK]
        a = mix(logits_a, bank, self.topk).reshape(logits_a.shape[0], -1)
        b = mix(logits_b, bank, self.topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        return a, b

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, p: dict[str, torch.Tensor], training: bool
    ) -> torch.Tensor:
        a, b = self.factors(p, training)
        if self.dropout and training:
            x = F.dropout(x, self.dropout, training=True)
        return result + F.linear(F.linear(x, a), b)

    def delta_weight(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = p["vblora_logits_A"].dtype
        if dtype in (torch.float16, torch.bfloat16):  # half-precision matmuls are slow on CPUs, as PEFT notes
            p = {k: v.float() for k, v in p.items()}
        a, b = self.factors(p)
        return (b @ a).to(dtype)
