"""`AdapterEvaluator`: one base model and one tokenized dataset, many adapters swapped through the store.

The base model is built once and wrapped once; each adapter is loaded with `load_adapter` under a fresh slot name,
evaluated, and deleted again, which gives the base its layers back. Nothing of the base is reloaded or copied, so
the per-adapter cost is the adapter read, the injection and the forwards. A failed load leaves the model as it
was (the store rolls it back) and is returned as a row with its error.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpeft.config.run_config import DataSection, ModelSection
from dpeft.eval.sources import AdapterRef, peft_folder

BUILTIN_METRICS = ("loss", "perplexity", "accuracy")
SPLITS = ("all", "validation", "train")
MetricFn = Callable[[torch.nn.Module, dict], Mapping[str, float]]


@dataclass
class EvalSpec:
    """What every adapter is evaluated on; picklable, so Ray actors receive it whole.

    Attributes:
        model: The base model (RunConfig's `model` section: a local HF folder, a packaged model, or 'tiny-llama').
        data: The data (RunConfig's `data` section), tokenized as `dpeft train` tokenizes it.
        metrics: Names among loss, perplexity, accuracy (seq_cls only), and/or functions
            ``fn(model, batch) -> {name: value}`` called per batch under `torch.no_grad`; their values are
            averaged over batches weighted by the batch's row count.
        split: Which examples: 'all', or the 'validation'/'train' split `dpeft train` makes with the same seed.
        batch_size: Examples per forward.
        seed: Seed of the base build (tiny-llama's random weights) and of the data shuffle/split.
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
        threads: torch CPU threads (0 = torch's default).
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    metrics: list = field(default_factory=lambda: ["loss"])
    split: str = "all"
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    threads: int = 0

    def metric_names(self) -> list[str]:
        return [m for m in self.metrics if isinstance(m, str)]


def _section(cls: type, value: Any, what: str):
    if isinstance(value, cls):
        return value
    if isinstance(value, (str, os.PathLike)):
        return cls(source=os.fspath(value))
    if isinstance(value, Mapping):  # through the run config, so a bad key is reported as `model.x` / `data.x`
        from dpeft.config.run_config import RunConfig

        return getattr(RunConfig.from_dict({what: dict(value)}), what)
    raise TypeError(f"{what} must be a source string, a mapping of {cls.__name__} fields or a {cls.__name__}")


def make_spec(
    base: str | Mapping | ModelSection,
    dataset: str | Mapping | DataSection,
    metrics: str | MetricFn | Sequence[str | MetricFn] = ("loss",),
    **options: Any,
) -> EvalSpec:
    """An `EvalSpec` from user-facing arguments, checked before anything is built.

    Args:
        base: A model source string (`model.source`), a mapping of `model` fields, or a `ModelSection`.
        dataset: A data source string (`data.source`), a mapping of `data` fields, or a `DataSection`.
        metrics: A metric name, a function, or a list of them.
        **options: `EvalSpec` fields (split, batch_size, seed, device, threads).

    Raises:
        ValueError: for unknown metrics or options, a missing model/data source, or accuracy on a causal LM.
    """
    unknown = sorted(set(options) - {"split", "batch_size", "seed", "device", "threads"})
    if unknown:
        raise ValueError(f"unknown evaluation option(s) {unknown}; valid: split, batch_size, seed, device, threads")
    metrics = [metrics] if isinstance(metrics, str) or callable(metrics) else list(metrics)
    spec = EvalSpec(_section(ModelSection, base, "model"), _section(DataSection, dataset, "data"), metrics, **options)
    bad = [m for m in metrics if not (callable(m) or m in BUILTIN_METRICS)]
    if bad or not metrics:
        raise ValueError(f"metrics {bad or metrics}: use {list(BUILTIN_METRICS)} and/or functions fn(model, batch)")
    if "accuracy" in metrics and spec.model.task != "seq_cls":
        raise ValueError("metric 'accuracy' needs a classification base (model task 'seq_cls')")
    if spec.split not in SPLITS:
        raise ValueError(f"split={spec.split!r}: use one of {list(SPLITS)}")
    if spec.batch_size < 1:
        raise ValueError(f"batch_size={spec.batch_size}: must be >= 1")
    _check_sources(spec)
    return spec


def _check_sources(spec: EvalSpec) -> None:
    from dpeft.config.run_config import RunConfig
    from dpeft.train.setup import validate

    # The training config check names missing model/data sources the same way `dpeft train` does.
    validate(RunConfig(model=spec.model, data=spec.data))


class AdapterEvaluator:
    """Builds the base and the batches once; `evaluate(ref)` swaps one adapter in, measures, and swaps it out."""

    def __init__(self, spec: EvalSpec) -> None:
        from dpeft.dist import _pick_device

        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.device = _pick_device(spec.device, 0)  # under Ray, CUDA_VISIBLE_DEVICES holds the actor's GPU
        self._build()

    def _build(self) -> None:
        """The base model and the batches; also a fresh start after a failure left the wrapper in doubt."""
        from dpeft.train.data import collate, load_splits
        from dpeft.train.models import build_model

        spec = self.spec
        base, tokenizer = build_model(spec.model, spec.data.max_length, spec.seed)
        self.base = base.to(self.device).eval()
        splits = load_splits(spec.data, spec.model.task, tokenizer, spec.seed)
        examples = {"all": splits.validation + splits.train, "validation": splits.validation, "train": splits.train}
        examples = examples[spec.split]
        bs = spec.batch_size
        # Collated once: every adapter sees the very same tensors, and no adapter pays for padding again.
        self.batches = [
            {k: v.to(self.device) for k, v in collate(examples[i : i + bs], tokenizer.pad_id).items()}
            for i in range(0, len(examples), bs)
        ]
        self.model = None  # the PeftModel wrapper, made by the first successful load and kept from then on
        self._slots = 0

    def evaluate(self, ref: AdapterRef) -> dict[str, Any]:
        """The results row of one adapter: metrics, or `error` when it could not be loaded or run."""
        start = time.perf_counter()
        row: dict[str, Any] = {"adapter": ref.name, "status": "ok", "error": "", "method": "", "path": ref.path}
        if ref.error:
            return {**row, "status": "error", "error": ref.error, "seconds": 0.0}
        try:
            with peft_folder(ref) as folder:
                slot = self._load(folder)
            try:
                row["method"] = _method(self.model.peft_config[slot])
                row.update(self._metrics())
            finally:
                self._unload(slot)
        except Exception as exc:  # any adapter-level failure becomes its row; the next adapter goes on
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
            row["traceback"] = traceback.format_exc(limit=6)
        row["seconds"] = time.perf_counter() - start
        return row

    def _load(self, folder: str) -> str:
        from dpeft.model.task_models import task_model_class

        self._slots += 1
        slot = f"eval_{self._slots}"
        if self.model is None:
            task = "SEQ_CLS" if self.spec.model.task == "seq_cls" else "CAUSAL_LM"
            self.model = task_model_class(task).from_pretrained(self.base, folder, adapter_name=slot)
        else:
            self.model.load_adapter(folder, slot)
        self.model.set_adapter(slot)
        self.model.eval()
        return slot

    def _unload(self, slot: str) -> None:
        try:
            self.model.delete_adapter(slot)
        except Exception:
            # The wrapper is in an unknown state: rebuild the base rather than evaluate later adapters on it.
            self._build()
            raise

    @torch.no_grad()
    def _metrics(self) -> dict[str, float]:
        from dpeft.train.loop import has_virtual_positions, loss_sum, target_count

        task, model = self.spec.model.task, self.model
        totals = [0.0, 0, 0.0]  # loss sum, loss terms, correct predictions
        user: dict[str, float] = {}
        rows = 0
        names = self.spec.metric_names()
        for batch in self.batches:
            n = batch["input_ids"].shape[0]
            rows += n
            if names:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                totals[0] += float(loss_sum(logits, batch["labels"], task))
                totals[1] += target_count(batch, task, has_virtual_positions(logits, batch["labels"], task))
                if task == "seq_cls":
                    totals[2] += float((logits.argmax(-1) == batch["labels"]).sum())
            for fn in (m for m in self.spec.metrics if callable(m)):
                for key, value in fn(model, batch).items():
                    user[key] = user.get(key, 0.0) + float(value) * n
        loss = totals[0] / max(totals[1], 1)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": totals[2] / max(rows, 1)}
        result = {name: out[name] for name in names}
        clash = sorted(set(user) & set(result))
        if clash:
            raise ValueError(f"metric function returned {clash}, which are built-in metric names; rename them")
        return {**result, **{k: v / max(rows, 1) for k, v in user.items()}}


def _method(config) -> str:
    peft_type = getattr(config, "peft_type", "")
    return str(getattr(peft_type, "value", peft_type))
