"""Pieces of the training loop: optimizer, learning-rate schedule, loss sums, gradient clipping, evaluation.

Losses are computed as sums over the tokens (or rows) a rank holds, divided by the count of the whole global
batch, so the sum over ranks is the global-batch mean whatever the split; see `run.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dpeft.config.run_config import OptimSection
from dpeft.train.data import IGNORE_INDEX, Example, collate


def build_optimizer(params: list[nn.Parameter], cfg: OptimSection) -> torch.optim.Optimizer:
    """The optimizer over `params` (the store's local shards under the sharded backend)."""
    if not params:
        raise ValueError("no trainable adapter parameters: check peft.target_modules against the model")
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(step: int, total: int, cfg: OptimSection) -> float:
    """Learning rate of optimizer step `step` (0-based); a pure function of the step, so resuming needs no state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def target_count(batch: dict[str, torch.Tensor], task: str, virtual: bool = False) -> int:
    """How many terms the global-batch mean loss averages: rows (seq_cls) or predicted tokens (causal_lm).

    `virtual`: the model puts virtual-token outputs in front of a causal LM's (see `has_virtual_positions`); then
    the first real token is predicted too, from the last virtual position.
    """
    if task == "seq_cls":
        return batch["labels"].shape[0]
    labels = batch["labels"] if virtual else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def has_virtual_positions(logits: torch.Tensor, labels: torch.Tensor, task: str) -> bool:
    """Whether a prompt-learning adapter put virtual-token outputs in front of a causal LM's outputs."""
    return task != "seq_cls" and logits.shape[1] > labels.shape[1]


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy terms of a micro-batch, in float32.

    With virtual-token outputs in front (prompt learning on a causal LM) the terms are HF PEFT's `outputs.loss`
    terms: the last virtual position predicts the first real token, each real position the next one.
    """
    if task == "seq_cls":
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    virtual = logits.shape[1] - labels.shape[1]
    if virtual > 0:
        logits, targets = logits[:, virtual - 1 : -1], labels
    else:
        logits, targets = logits[:, :-1], labels[:, 1:]
    logits = logits.float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (the local shard of an fsdp2 `DTensor` gradient; in-place ops reach it)."""
    return grad.to_local() if hasattr(grad, "to_local") else grad


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, sharded: bool, all_reduce_mean, world: int) -> float:
    """Clip the global gradient norm; with sharded gradients each rank holds a disjoint part of the sum."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    sq = float(sum(g.detach().float().pow(2).sum() for g in grads)) if grads else 0.0
    if sharded and world > 1:
        sq = all_reduce_mean(sq) * world
    norm = math.sqrt(sq)
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    task: str,
    metrics: list[str],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast,
    rank: int,
    world: int,
    all_reduce_mean,
) -> dict[str, float]:
    """Validation metrics over `examples`, each rank taking every W-th example.

    Every rank runs the same number of forwards (a rank with nothing left runs one row at weight 0), because
    forwards of the sharded backend are collective.
    """
    unknown = sorted(set(metrics) - {"loss", "accuracy", "perplexity"})
    if unknown or ("accuracy" in metrics and task != "seq_cls"):
        raise ValueError(f"train.eval_metrics {metrics}: use loss, perplexity, and accuracy (seq_cls only)")
    if not examples or not metrics:
        return {}
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(examples), world))
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, loss terms, correct predictions
    for b in range(n_batches):
        rows = mine[b * batch_size : (b + 1) * batch_size]
        weight = 1.0 if rows else 0.0
        batch = collate([examples[i] for i in (rows or [0])], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        totals[0] += weight * float(loss_sum(logits, batch["labels"], task))
        totals[1] += weight * target_count(batch, task, has_virtual_positions(logits, batch["labels"], task))
        if task == "seq_cls":
            totals[2] += weight * float((logits.argmax(-1) == batch["labels"]).sum())
    if world > 1:
        totals = torch.tensor([all_reduce_mean(float(t)) * world for t in totals], dtype=torch.float64)
    model.train(was_training)
    loss = float(totals[0] / max(totals[1], 1))
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": float(totals[2]) / len(examples)}
    return {name: out[name] for name in metrics}
