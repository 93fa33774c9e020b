"""AdaLoRA's rank allocator (the budget schedule and triplet importance of the paper, as HF PEFT runs them).

Each step it smooths every element's sensitivity I = |p * grad p| of A, E and B with an EMA (beta1) and tracks the
uncertainty U = EMA (beta2) of |I - EMA(I)|; an element's score is EMA(I) * U. A singular triplet's score is its
E score plus the mean score of its row of A and of its column of B. Every `deltaT` steps of the budgeting phase the
triplets at or below the k-th smallest score (k = initial budget - current budget) get E = 0, and the kept flags
become the config's `rank_pattern`; the budget falls cubically from ``init_r * layers`` to ``target_r * layers``.

Statistics live in the shape of the local tensors, so under the sharded store backend each rank keeps its rows
only; the per-triplet reductions read full score tensors through `store.gather` (a collective there, free locally).
"""

from __future__ import annotations

import torch

from dpeft.methods.adalora.config import AdaLoraConfig

_TENSORS = ("lora_A", "lora_E", "lora_B")


def pattern_key(module_name: str) -> str:
    """The `rank_pattern` key of a module, as PEFT writes it in `adapter_config.json` (adapter name stripped)."""
    return f"{module_name}.lora_E"


class RankAllocator:
    """Budget schedule and importance statistics of one trainable AdaLoRA adapter.

    Args:
        store: The model's `AdapterStore`.
        adapter_name: The adapter whose triplets it allocates.
        config: Its config (`rank_pattern` is written into it).
    """

    def __init__(self, store, adapter_name: str, config: AdaLoraConfig) -> None:
        self.store = store
        self.adapter_name = adapter_name
        self.peft_config = config
        self.beta1, self.beta2 = config.beta1, config.beta2
        n_layers = len(self.entries())
        # From the config, as PEFT counts it when the model is built (before a loaded rank pattern shrinks layers).
        self.init_bgt = config.init_r * n_layers
        self.target_bgt = config.target_r * n_layers
        self.reset_ipt()

    def entries(self) -> list:
        return [e for e in self.store.entries(self.adapter_name) if "lora_E" in e.specs]

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def state_tensors(self) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
        """``"<module>.<tensor>/<average>"`` -> (the store parameter, its average as this rank holds it). An average
        not accumulated yet is given as zeros: the first update and the scores treat zeros and absence alike."""
        out = {}
        for entry in self.entries():
            for name in _TENSORS:
                param, key = entry.params[name], (entry.module_name, name)
                for stat, table in (("exp_avg_ipt", self.exp_avg_ipt), ("exp_avg_unc", self.exp_avg_unc)):
                    value = table.get(key)
                    out[f"{entry.module_name}.{name}/{stat}"] = (
                        param,
                        torch.zeros_like(param.detach()) if value is None else value,
                    )
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install averages named as `state_tensors` names them (e.g. read from a checkpoint)."""
        self.reset_ipt()
        for entry in self.entries():
            for name in _TENSORS:
                key = (entry.module_name, name)
                for stat, table in (("exp_avg_ipt", self.exp_avg_ipt), ("exp_avg_unc", self.exp_avg_unc)):
                    table[key] = tensors[f"{entry.module_name}.{name}/{stat}"]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step): warm-up, cubic decrease, final phase."""
        c = self.peft_config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Fold this step's sensitivities |p * grad| into the EMAs (call after backward, before zero_grad)."""
        for entry in self.entries():
            for name in _TENSORS:
                param = entry.params[name]
                if param.grad is None:
                    raise ValueError(
                        f"{entry.module_name}.{name} has no gradient: call update_and_allocate(step) after "
                        "loss.backward() and before optimizer.zero_grad()"
                    )
                key = (entry.module_name, name)
                ipt = (param * param.grad).abs()
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(ipt))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(ipt))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.ipt[key] = ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def _full_score(self, entry, name: str) -> torch.Tensor:
        key = (entry.module_name, name)
        local = entry.params[name].detach()
        if key in self.exp_avg_ipt:
            local = self.exp_avg_ipt[key] * self.exp_avg_unc[key]
        else:
            local = torch.zeros_like(local)
        return self.store.gather(entry, name, local)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Module name -> (r,) importance of each singular triplet."""
        out = {}
        for entry in self.entries():
            score_a = self._full_score(entry, "lora_A").mean(dim=1)
            score_b = self._full_score(entry, "lora_B").mean(dim=0)
            score_e = self._full_score(entry, "lora_E").view(-1)
            out[entry.module_name] = score_e + torch.stack([score_a, score_b], dim=1).sum(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E of every triplet scoring at or below the budget's threshold; returns the kept flags."""
        scores = self.triplet_scores()
        flat = torch.cat([s for s in scores.values()]) if scores else torch.zeros(0)
        k = self.init_bgt - budget
        if k <= 0 or flat.numel() == 0:
            threshold = float("-inf")  # nothing to prune (PEFT's kthvalue would fail with k = 0)
        else:
            threshold = torch.kthvalue(flat, k=min(k, flat.numel()))[0].item()
        return self._apply({name: score > threshold for name, score in scores.items()})

    def _apply(self, keep: dict[str, torch.Tensor]) -> dict[str, list[bool]]:
        rank_pattern = {}
        for entry in self.entries():
            flags = keep.get(entry.module_name)
            if flags is None:
                continue
            value = self.store.gather(entry, "lora_E")
            if value.shape[0] == flags.numel():
                self.store.write(entry, "lora_E", value.masked_fill(~flags.view(-1, 1).to(value.device), 0.0))
            rank_pattern[pattern_key(entry.module_name)] = flags.view(-1).tolist()
        return rank_pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero E where `rank_pattern` (the final allocation) pruned triplets."""
        keep = {}
        for entry in self.entries():
            flags = self.peft_config.kept_triplets(entry.module_name) if rank_pattern else None
            if flags is not None:
                keep[entry.module_name] = torch.tensor(flags, dtype=torch.bool)
        self._apply(keep)

    def update_and_allocate(self, global_step: int, force_mask: bool = False) -> tuple[int, dict | None]:
        """One allocation step (PEFT's `RankAllocator.update_and_allocate`): (budget, new rank pattern or None)."""
        c = self.peft_config
        if global_step < c.total_step - c.tfinal:
            self.update_ipt()
        budget, mask_ind = self.budget_schedule(global_step)
        return budget, (self.mask_to_budget(budget) if mask_ind or force_mask else None)
