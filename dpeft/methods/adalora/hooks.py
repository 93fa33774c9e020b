"""AdaLoRA's model-level behaviour: one trainable adapter, `update_and_allocate`, the orthogonal regulariser and
the rank pattern applied to saved tensors (PEFT's `AdaLoraModel`), through the generic `ModelHooks` points."""

from __future__ import annotations

import torch

from dpeft.config import PeftConfig
from dpeft.methods.adalora.allocator import RankAllocator
from dpeft.methods.adalora.config import AdaLoraConfig
from dpeft.methods.hooks import ModelHooks
from dpeft.store import PEFT_PREFIX


class AdaLoraHooks(ModelHooks):
    """Rank allocation and regularisation of one AdaLoRA adapter (an allocator only when it trains)."""

    exports = ("update_and_allocate", "rankallocator", "trainable_adapter_name")
    train_config_fields = ("rank_pattern",)

    def __init__(self, tuner, adapter_name: str, config: AdaLoraConfig) -> None:
        super().__init__(tuner, adapter_name, config)
        self.trainable_adapter_name = adapter_name
        self.rankallocator = None if config.inference_mode else RankAllocator(tuner.store, adapter_name, config)

    @classmethod
    def check_adapters(cls, configs: dict[str, PeftConfig]) -> None:
        if sum(not c.inference_mode for c in configs.values()) > 1:
            raise ValueError(
                "AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode "
                "to True for all adapters except the one you want to train."
            )

    @classmethod
    def run_defaults(cls, steps: int) -> dict[str, int]:
        """A run's budget schedule spans the run: ``total_step`` is the run's step count unless the config sets it."""
        return {"total_step": steps}

    @property
    def serves_exports(self) -> bool:
        return self.rankallocator is not None

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance statistics and the rank budget; call it every step after ``loss.backward()``
        (and the optimizer step) and before ``zero_grad()``, as with PEFT's ``model.base_model.update_and_allocate``.
        """
        allocator = self.rankallocator
        if allocator is None:
            raise ValueError(
                f"AdaLoRA adapter {self.adapter_name!r} is in inference mode and allocates no ranks; load it with "
                "is_trainable=True (or build it with inference_mode=False) to train it"
            )
        config = self.config
        end = config.total_step - config.tfinal
        if global_step < end:
            _, rank_pattern = allocator.update_and_allocate(global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
        elif global_step == end:
            _, rank_pattern = allocator.update_and_allocate(global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            allocator.reset_ipt()
        elif config.rank_pattern:
            allocator.mask_using_rank_pattern(config.rank_pattern)

    def after_optimizer_step(self, global_step: int) -> None:
        """`update_and_allocate` at PEFT's documented point (after ``optimizer.step()``, before ``zero_grad()``)."""
        if self.rankallocator is not None:
            self.update_and_allocate(global_step)

    def train_state(self) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
        """The allocator's importance and uncertainty averages (none for an adapter in inference mode)."""
        return {} if self.rankallocator is None else self.rankallocator.state_tensors()

    def load_train_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.rankallocator is not None:
            self.rankallocator.load_state_tensors(tensors)

    def extra_loss(self) -> torch.Tensor | None:
        """``orth_reg_weight`` times the mean of ||A A^T - I||_F and ||B^T B - I||_F over the adapter's layers."""
        config = self.config
        if self.rankallocator is None or config.orth_reg_weight == 0:
            return None
        store = self.tuner.store
        total, count = None, 0
        for entry in store.entries(self.adapter_name):
            if "lora_E" not in entry.specs:
                continue
            p = store.get(entry)
            for cov in (p["lora_A"] @ p["lora_A"].T, p["lora_B"].T @ p["lora_B"]):
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                term = torch.linalg.matrix_norm(cov - eye)
                total = term if total is None else total + term
                count += 1
        return None if total is None else config.orth_reg_weight * (total / count)

    @staticmethod
    def saved_state(config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop the triplets the rank pattern pruned, as PEFT saves them (tensors already that small stay)."""
        if not getattr(config, "rank_pattern", None):
            return state
        out = dict(state)
        for key, flags in config.rank_pattern.items():
            module = key.partition(".lora_E")[0]
            keep = torch.tensor([bool(f) for f in flags], dtype=torch.bool)
            for name, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
                k = f"{PEFT_PREFIX}{module}.{name}"
                if k in out and out[k].shape[dim] == keep.numel() != int(keep.sum()):
                    out[k] = out[k].index_select(dim, keep.nonzero().view(-1).to(out[k].device))
        return out
