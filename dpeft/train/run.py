"""`run(cfg)`: the one training entry point, called by `dpeft train`, torchrun and Ray workers alike.

Every rank builds the same model, data and global batch order; each step every rank takes its 1/W rows of the
same global batch. A rank's loss is its sum of loss terms divided by the global batch's count and multiplied by
W, so that the ranks' gradients *averaged* (by the sharded store's reduce-scatter, or the local backend's
all-reduce) are exactly the gradient of the global-batch mean: W=1 and W=N runs follow the same trajectory.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dpeft.config.run_config import RunConfig, load_run_config
from dpeft.dist import DistInfo, all_reduce_mean, barrier, init_distributed
from dpeft.model.model_hooks import after_optimizer_step, extra_loss
from dpeft.model.tuner import tuner_of
from dpeft.train.data import GlobalOrder, collate, load_splits
from dpeft.train.loop import (
    build_optimizer,
    clip_grad_norm,
    evaluate,
    has_virtual_positions,
    loss_sum,
    lr_at,
    target_count,
)
from dpeft.train.models import build_model
from dpeft.train.scaler import LossScaler
from dpeft.train.setup import build_peft_model, resolve_backend, validate, wrap_deepspeed

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    """What a run did; `losses[i]` is the global-batch mean loss of step `first_step + i` (plus the adapter
    method's extra loss term where it has one, e.g. AdaLoRA's orthogonal regulariser, as PEFT's ``outputs.loss``)."""

    losses: list[float]
    first_step: int
    final_step: int
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    wall_time: float
    throughput: float
    throughput_unit: str
    backend: str
    world_size: int
    resumed_from: str | None = None
    adapter_dir: str | None = None
    checkpoints: list[str] = field(default_factory=list)


class _MetricsLog:
    """metrics.jsonl, written by rank 0 only (appended to when a run resumes)."""

    def __init__(self, path: str, enabled: bool, append: bool) -> None:
        self.file = None
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run(
    cfg: RunConfig | str | os.PathLike,
    overrides: list[str] | None = None,
    on_report: Callable[[dict, str | None], None] | None = None,
) -> RunResult:
    """Train as `cfg` says, in one process or as one rank of a torchrun/Ray job, and return what happened.

    Args:
        cfg: A `RunConfig`, or the path of a YAML run config.
        overrides: Dotted ``section.field=value`` overrides applied to a YAML path.
        on_report: Called on every rank as ``on_report(metrics, checkpoint_dir)`` after each step that logs,
            evaluates or saves (``metrics`` is what metrics.jsonl gets for that step, validation metrics under
            ``"validation"``; ``checkpoint_dir`` the step directory saved at that step, else None), and once at the
            end with the closing record. Every rank makes the same calls, so it may run collectives (Ray's
            `ray.train.report` is one).
    """
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg, overrides)
    validate(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = init_distributed(cfg.train.device)
    trainer = _Trainer(cfg, info)
    trainer.on_report = on_report
    try:
        return trainer.fit()
    finally:
        trainer.log.close()


class _Trainer:
    def __init__(self, cfg: RunConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.on_report: Callable[[dict, str | None], None] | None = None
        self.world, self.rank = info.world_size, info.rank
        self.main = info.rank == 0
        self.backend = resolve_backend(cfg.store.backend, info.world_size)
        model, self.tokenizer = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
        self.splits = load_splits(cfg.data, cfg.model.task, self.tokenizer, cfg.train.seed)
        self.model = build_peft_model(model.to(info.device), cfg, self.backend, info)
        self.params = self.model.store.optimizer_parameters()
        self.hooks = tuner_of(self.model).model_hooks  # methods' model-level training steps (see setup.py)
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.engine = None  # the DeepSpeed engine under the deepspeed backend: backward and step go through it
        if self.backend == "deepspeed" and self.world > 1:
            self.engine = wrap_deepspeed(self.model, self.optimizer, cfg, info)
            self.optimizer = self.engine.optimizer  # what checkpoints save: DeepSpeed's partitions, via the store
        self.scaler = LossScaler(enabled=cfg.train.mixed_precision == "fp16")
        self.order = GlobalOrder(len(self.splits.train), cfg.train.seed)
        self.ckpt_root = cfg.checkpoint.dir or os.path.join(cfg.output.dir, "checkpoints")
        self.start_step, self.resumed_from = 0, None
        # Dropout masks differ per rank; a resume then restores the RNG state saved with the checkpoint.
        torch.manual_seed(cfg.train.seed + 1 + self.rank)
        self._resume()
        self.log = _MetricsLog(os.path.join(cfg.output.dir, "metrics.jsonl"), self.main, self.resumed_from is not None)
        self.unit = "samples" if cfg.model.task == "seq_cls" else "tokens"

    def autocast(self):
        amp = _AMP.get(self.cfg.train.mixed_precision)
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=amp)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        if mode == "auto":
            if not os.path.isdir(self.ckpt_root):
                return
            from dpeft.checkpoint.dcp import latest_checkpoint

            path = latest_checkpoint(self.ckpt_root)
            if path is None:
                return
        else:
            path = mode
            if not os.path.isdir(path):
                raise ValueError(
                    f"checkpoint.resume={path!r} is not a checkpoint directory; use auto, never or the "
                    "path of a step-XXXXXXXX folder"
                )
        from dpeft.checkpoint.dcp import load_checkpoint

        extra = load_checkpoint(path, self.model, self.optimizer)
        self.start_step, self.order.position = int(extra["step"]), int(extra["data_position"])
        self.scaler.scale = float(extra.get("loss_scale", self.scaler.scale))
        self.resumed_from = path

    def _save(self, step: int) -> str:
        from dpeft.checkpoint.dcp import save_checkpoint

        extra = {"step": step, "data_position": self.order.position, "loss_scale": self.scaler.scale}
        return save_checkpoint(
            self.ckpt_root, step, self.model, self.optimizer, extra, keep_last=self.cfg.checkpoint.keep_last
        )

    # ------------------------------------------------------------------ steps
    def _micro_batches(self):
        """This rank's micro-batches of the next global batch, a function of the first micro-batch's logits giving
        the global batch's loss-term count (it depends on whether the model adds virtual positions), and its size."""
        tcfg = self.cfg.train
        batch = collate([self.splits.train[i] for i in self.order.take(tcfg.global_batch_size)], self.tokenizer.pad_id)
        task = self.cfg.model.task

        def count(logits: torch.Tensor) -> int:
            return target_count(batch, task, has_virtual_positions(logits, batch["labels"], task))

        per_rank = tcfg.global_batch_size // self.world
        micro = per_rank // tcfg.grad_accum_steps
        units = tcfg.global_batch_size if self.unit == "samples" else int(batch["attention_mask"].sum())
        starts = range(self.rank * per_rank, (self.rank + 1) * per_rank, micro)
        parts = [{k: v[s : s + micro].to(self.info.device) for k, v in batch.items()} for s in starts]
        return parts, count, units

    def step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns (global-batch mean loss, tokens or samples in the global batch)."""
        if self.engine is not None:
            return self._engine_step(step)
        parts, counter, units = self._micro_batches()
        local, extra_total, count = torch.zeros((), dtype=torch.float64), 0.0, None
        for i, part in enumerate(parts):
            with self.autocast():
                logits = self.model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            count = count or counter(logits)
            terms = loss_sum(logits, part["labels"], self.cfg.model.task)
            loss = terms * (self.world / count)
            # A method's extra loss (AdaLoRA's regulariser) depends on the adapter only, the same on every rank and
            # micro-batch: added once per step (one read of the tensors, a gather under the sharded backends).
            extra = extra_loss(self.hooks) if i == 0 else None
            if extra is not None:
                loss = loss + extra
                extra_total = float(extra.detach())
            (loss * self.scaler.scale).backward()
            local += terms.detach().double().cpu()
        if self.backend == "local" and self.world > 1:
            from dpeft.dist import all_reduce_grads

            all_reduce_grads(self.params)
        sharded = self.backend in ("sharded", "fsdp2") and self.world > 1  # each rank holds part of the grads
        if self.scaler.unscale(self.params, sharded, all_reduce_mean, self.world):
            if self.cfg.optim.max_grad_norm is not None:
                clip_grad_norm(self.params, self.cfg.optim.max_grad_norm, sharded, all_reduce_mean, self.world)
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.cfg.train.steps, self.cfg.optim)
            self.optimizer.step()
            after_optimizer_step(self.hooks, step)  # e.g. AdaLoRA's update_and_allocate: it reads the gradients
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(local) / count
        return (all_reduce_mean(loss) * self.world if self.world > 1 else loss) + extra_total, units

    def _engine_step(self, step: int) -> tuple[float, int]:
        """`step` under DeepSpeed: the engine averages gradients, clips and steps at the last micro-batch."""
        parts, counter, units = self._micro_batches()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg.train.steps, self.cfg.optim)
        local, count = torch.zeros((), dtype=torch.float64), None
        for part in parts:
            with self.autocast():
                logits = self.engine(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            count = count or counter(logits)
            terms = loss_sum(logits, part["labels"], self.cfg.model.task)
            # Already the global-batch share: DeepSpeed must not divide by the accumulation steps again.
            self.engine.backward(terms * (self.world / count), scale_wrt_gas=False)
            self.engine.step()
            local += terms.detach().double().cpu()
        return all_reduce_mean(float(local) / count) * self.world, units

    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        return evaluate(
            self.model,
            self.splits.validation,
            self.cfg.model.task,
            list(t.eval_metrics),
            batch_size=t.eval_batch_size,
            pad_id=self.tokenizer.pad_id,
            device=self.info.device,
            autocast=self.autocast,
            rank=self.rank,
            world=self.world,
            all_reduce_mean=all_reduce_mean,
        )

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        before = self.evaluate()
        self._report("validation before training", before, self.start_step)
        losses, checkpoints, total_units, train_time = [], [], 0, 0.0
        bar = tqdm(
            total=t.steps,
            initial=self.start_step,
            disable=not (self.main and t.progress_bar),
            desc="train",
            dynamic_ncols=True,
        )
        after, evaluated_at = before, self.start_step
        start = time.perf_counter()
        self.model.train()
        for step in range(self.start_step, t.steps):
            tic = time.perf_counter()
            loss, units = self.step(step)
            elapsed = time.perf_counter() - tic
            losses.append(loss)
            total_units, train_time = total_units + units, train_time + elapsed
            rate = units / max(elapsed, 1e-9)
            bar.set_postfix({"loss": f"{loss:.4f}", f"{self.unit}/s": f"{rate:.0f}"}, refresh=False)
            bar.update(1)
            record, saved = {}, None
            if t.log_every and ((step + 1) % t.log_every == 0 or step + 1 == t.steps):
                lr = lr_at(step, t.steps, cfg.optim)
                record = {"step": step + 1, "loss": loss, "lr": lr, f"{self.unit}_per_s": rate}
                self.log.write(record)
            if t.eval_every and (step + 1) % t.eval_every == 0:
                after, evaluated_at = self.evaluate(), step + 1
                self._report(f"validation at step {step + 1}", after, step + 1)
                record = {**record, "validation": after}
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
                saved = self._save(step + 1)
                checkpoints.append(saved)
            if self.on_report is not None and (record or saved):
                self.on_report({**record, "step": step + 1}, saved)
        bar.close()
        if evaluated_at != t.steps:
            after = self.evaluate()
        self._report("validation after training", after, t.steps)
        adapter_dir = self._save_adapter()
        result = RunResult(
            losses,
            self.start_step,
            t.steps,
            before,
            after,
            time.perf_counter() - start,
            total_units / max(train_time, 1e-9),
            f"{self.unit}/s",
            self.backend,
            self.world,
            self.resumed_from,
            adapter_dir,
            checkpoints,
        )
        end = {
            "event": "end",
            "step": t.steps,
            "wall_time": result.wall_time,
            f"{self.unit}_per_s": result.throughput,
            "validation": after,
        }
        self.log.write(end)
        if self.on_report is not None:
            self.on_report(end, None)
        return result

    def _report(self, what: str, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        self.log.write({"step": step, "split": "validation", **metrics})
        if self.main:
            text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            tqdm.write(f"{what} (step {step}): {text}")

    def _save_adapter(self) -> str | None:
        """The final adapter in PEFT's format; every rank takes part because the sharded store gathers."""
        if not self.cfg.output.save_adapter:
            return None
        path = os.path.join(self.cfg.output.dir, "adapter")
        self.model.save_pretrained(path, is_main_process=self.main)
        barrier()
        if self.main:
            tqdm.write(f"saved the PEFT-format adapter to {path}")
        return path
