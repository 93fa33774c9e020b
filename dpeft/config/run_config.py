"""`RunConfig`: what `dpeft train` runs, as dataclasses loaded from YAML with dotted `a.b=c` overrides.

Each field carries one line of documentation (its ``doc`` metadata), which also serves `dpeft train --help`.
Unknown keys are errors that list the valid ones; values of the wrong type are errors naming the field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation; mutable defaults are copied per instance."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelSection:
    """The base model."""

    source: str = _f(
        "tiny-llama",
        "A local Hugging Face model folder, a packaged model ('all-minilm-l6-v2', "
        "'smollm2-135m'), or 'tiny-llama' (random weights built from `tiny`).",
    )
    task: Literal["causal_lm", "seq_cls"] = _f(
        "causal_lm", "What the model learns: next-token prediction (causal_lm) or sequence classification (seq_cls)."
    )
    num_labels: int = _f(2, "Number of classes for seq_cls.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the base model weights.")
    tiny: dict = _f(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "LlamaConfig fields for source 'tiny-llama' (byte-level tokens: vocab_size 259).",
    )
    load_in_4bit: bool = _f(
        False,
        "QLoRA: quantize the base's linear layers (not the output head) to bitsandbytes "
        "4-bit (Linear4bit) before adding adapters.",
    )
    load_in_8bit: bool = _f(
        False,
        "Quantize the base's linear layers (not the output head) to bitsandbytes 8-bit (Linear8bitLt, LLM.int8()).",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type.")
    bnb_4bit_use_double_quant: bool = _f(True, "4-bit: also quantize the per-block scales (QLoRA's double quant).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(
        None, "4-bit: dtype of the dequantized matmul; null = the input's dtype."
    )


@dataclass
class DataSection:
    """The training and validation data."""

    source: str = _f(
        "hamlet",
        "A packaged dataset ('rotten_tomatoes', 'chatterbot_qa', 'hamlet') or the path of a "
        "local .jsonl, .csv or .txt file.",
    )
    text_field: str = _f("text", "Column/key holding the input text (jsonl/csv), or the prompt for Q/A data.")
    label_field: str = _f("label", "Column/key holding the class label (seq_cls; integers or strings).")
    response_field: str | None = _f(
        None,
        "Column/key holding the answer for prompt/answer data (causal_lm); the "
        "loss then covers only the answer tokens.",
    )
    max_length: int = _f(
        128, "Tokens per example (longer inputs are truncated; txt files are cut into chunks of this length)."
    )
    validation_size: float = _f(0.1, "Held-out validation split: a fraction (< 1) or a number of examples.")
    limit: int | None = _f(None, "Use at most this many examples in all (after a seeded shuffle); null = all.")


@dataclass
class StoreSection:
    """Where adapter state lives."""

    backend: Literal["auto", "local", "sharded", "fsdp2", "deepspeed"] = _f(
        "auto",
        "'local' (plain parameters, gradients all-reduced when distributed), 'sharded' (ZeRO-3 style over "
        "ranks, adapter state only), 'fsdp2' (FSDP2 fully_shard of base and adapters per transformer block), "
        "'deepspeed' (DeepSpeed ZeRO) or 'auto' (sharded under torchrun); one process always runs 'local'.",
    )
    fsdp_param_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(
        None,
        "fsdp2 mixed precision: dtype the gathered parameters (base and adapters) compute in; null = their own "
        "dtype (no mixed precision).",
    )
    fsdp_reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(
        None, "fsdp2 mixed precision: dtype gradients are reduce-scattered in; null = the compute dtype."
    )
    fsdp_cpu_offload: bool = _f(
        False,
        "fsdp2: keep sharded parameters, gradients and optimizer state on the CPU (CPUOffloadPolicy; for CUDA "
        "runs, a no-op on CPU runs).",
    )
    fsdp_reshard_after_forward: bool = _f(
        True,
        "fsdp2: free each block's gathered parameters after its forward and gather them again in backward "
        "(less memory, one more all-gather per block).",
    )
    deepspeed_zero_stage: Literal[2, 3] = _f(
        3,
        "deepspeed: ZeRO stage; 2 partitions gradients and optimizer state, 3 also the parameters (base model "
        "included), gathered per adapted layer around its forward and backward.",
    )
    deepspeed_offload_optimizer: bool = _f(
        False, "deepspeed: keep optimizer state on the CPU (ZeRO-Offload; for CUDA runs, a no-op on CPU runs)."
    )
    deepspeed_offload_param: bool = _f(
        False, "deepspeed, ZeRO-3 only: keep partitioned parameters on the CPU between uses (for CUDA runs)."
    )


@dataclass
class OptimSection:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = _f("adamw", "Optimizer.")
    lr: float = _f(1e-3, "Peak learning rate.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (adamw) or L2 penalty (sgd).")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    momentum: float = _f(0.0, "SGD momentum.")
    schedule: Literal["constant", "linear", "cosine"] = _f(
        "constant", "Decay after warmup: none, linear to 0, or cosine to 0 at the last step."
    )
    warmup_steps: int = _f(0, "Steps of linear warmup from 0 to lr.")
    max_grad_norm: float | None = _f(None, "Clip the global gradient norm to this value; null = no clipping.")


@dataclass
class TrainSection:
    """The training loop."""

    steps: int = _f(100, "Optimizer steps.")
    global_batch_size: int = _f(
        16,
        "Examples per optimizer step over all ranks and accumulation steps; must be a "
        "multiple of world size x grad_accum_steps.",
    )
    grad_accum_steps: int = _f(1, "Micro-batches accumulated per optimizer step on each rank.")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f(
        "no", "Autocast the forward to this dtype (fp16 adds loss scaling)."
    )
    seed: int = _f(0, "Seed of adapter init, data order and dropout.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where to compute: CUDA when available (auto), or forced.")
    threads: int = _f(
        0,
        "CPU threads per rank for torch ops (0 = torch's default); 1 helps when ranks or other "
        "jobs share few cores, where threads spin against each other.",
    )
    eval_every: int = _f(0, "Evaluate every this many steps (0 = only before and after training).")
    eval_batch_size: int = _f(64, "Examples per evaluation batch on each rank.")
    eval_metrics: list = _f(["loss"], "Validation metrics: loss, accuracy (seq_cls), perplexity (causal_lm).")
    log_every: int = _f(1, "Write a metrics.jsonl record every this many steps.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar on rank 0.")


@dataclass
class CheckpointSection:
    """Distributed checkpoints for resuming."""

    dir: str | None = _f(None, "Root folder of step-XXXXXXXX checkpoints; null = output.dir/checkpoints.")
    every: int = _f(0, "Save every this many steps (0 = never).")
    keep_last: int | None = _f(None, "Keep only the newest this many checkpoints; null = keep all.")
    resume: str = _f(
        "auto",
        "'auto' (continue from the newest complete checkpoint in dir, if any), 'never', or "
        "the path of a step directory.",
    )


@dataclass
class OutputSection:
    """What the run leaves behind."""

    dir: str = _f("runs/dpeft", "Folder for metrics.jsonl and the final PEFT-format adapter (dir/adapter).")
    save_adapter: bool = _f(True, "Save the final adapter with save_pretrained (rank 0).")


@dataclass
class RunConfig:
    """A training run: the sections below, each a YAML mapping."""

    model: ModelSection = field(default_factory=ModelSection, metadata={"doc": ModelSection.__doc__})
    data: DataSection = field(default_factory=DataSection, metadata={"doc": DataSection.__doc__})
    peft: dict = _f(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "The adapter config, passed to dpeft.get_peft_config (PEFT's field names; task_type is set from "
        "model.task when absent).",
    )
    store: StoreSection = field(default_factory=StoreSection, metadata={"doc": StoreSection.__doc__})
    optim: OptimSection = field(default_factory=OptimSection, metadata={"doc": OptimSection.__doc__})
    train: TrainSection = field(default_factory=TrainSection, metadata={"doc": TrainSection.__doc__})
    checkpoint: CheckpointSection = field(
        default_factory=CheckpointSection, metadata={"doc": CheckpointSection.__doc__}
    )
    output: OutputSection = field(default_factory=OutputSection, metadata={"doc": OutputSection.__doc__})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from nested dicts; unknown keys and wrong types raise `ValueError` naming the field."""
        return _build(cls, data, "")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'the run config'} must be a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"in section {path!r}" if path else "at the top level"
        raise ValueError(f"unknown config key(s) {unknown} {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        hint = hints[name]
        kwargs[name] = _build(hint, value, key) if dataclasses.is_dataclass(hint) else _check(hint, value, key)
    return cls(**kwargs)


def _check(hint: Any, value: Any, key: str) -> Any:
    """`value` if it fits type `hint` (ints are accepted for floats; YAML strings like '1e-3' too), else raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ValueError(f"{key} must be {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.steps=20", "peft.r=4"]`` into nested dicts; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value, e.g. train.steps=20")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "tiny":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from the defaults when `path` is None) and apply dotted overrides.

    `peft` overrides are merged into the file's `peft` mapping (so `peft.r=4` changes only the rank).
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"run config {os.fspath(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{os.fspath(path)} must hold a YAML mapping of sections, not {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    return RunConfig.from_dict(data)


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field, in declaration order; for `--help`."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(field_docs(type(value), key + "."))
        else:
            rows.append((key, repr(value), f.metadata.get("doc", "")))
    return rows
