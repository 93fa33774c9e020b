"""VB-LoRA's `save_only_topk_weights` checkpoint form, as HF PEFT writes and reads it.

Instead of the full logits (..., num_vectors), PEFT saves ``<key>_topk_indices`` (the top-k indices, in the smallest
integer dtype that holds num_vectors) and ``<key>_topk_weights`` (the first k-1 softmax weights; the last is one
minus their sum). Reading rebuilds logits that are log(weight) at the indices and -inf elsewhere: the same top-k
mixtures, so the same outputs, but no longer trainable.
"""

from __future__ import annotations

import torch

from dpeft.config import PeftConfig
from dpeft.methods.hooks import ModelHooks

_LOGITS = ("vblora_logits_A", "vblora_logits_B")
_INDICES, _WEIGHTS = "_topk_indices", "_topk_weights"


def _index_dtype(num_vectors: int) -> torch.dtype:
    for dtype, limit in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if num_vectors < limit:
            return dtype
    return torch.int64


class VBLoRAHooks(ModelHooks):
    """Applies `save_only_topk_weights` to the state dicts written and read."""

    @staticmethod
    def saved_state(config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not config.save_only_topk_weights:
            return state
        out = {}
        for key, value in state.items():
            if not key.endswith(_LOGITS):
                out[key] = value
                continue
            logits, indices = value.topk(config.topk)
            out[key + _INDICES] = indices.to(_index_dtype(config.num_vectors))
            out[key + _WEIGHTS] = torch.softmax(logits, dim=-1)[..., :-1].contiguous()
        return out

    @staticmethod
    def loaded_state(config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(key.endswith(_INDICES) for key in state):
            return state
        out = {k: v for k, v in state.items() if not k.endswith((_INDICES, _WEIGHTS))}
        for key, indices in state.items():
            if not key.endswith(_INDICES):
                continue
            stem = key.removesuffix(_INDICES)
            if stem + _WEIGHTS not in state:
                raise ValueError(f"{stem + _INDICES} has no matching {stem + _WEIGHTS}: the checkpoint is incomplete")
            weights = state[stem + _WEIGHTS]
            weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
            full = torch.full((*weights.shape[:-1], config.num_vectors), float("-inf"), device=weights.device)
            out[stem] = full.scatter(-1, indices.long(), torch.log(weights))
        return out
