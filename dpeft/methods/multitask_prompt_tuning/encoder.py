"""Multitask prompt tuning's encoder: a shared prompt times a low-rank task matrix, chosen per row by `task_ids`."""

from __future__ import annotations

import torch
from torch import nn

from dpeft.methods.multitask_prompt_tuning.config import SOURCE_INITS, MultitaskPromptTuningConfig
from dpeft.methods.prompt_base import PROMPT_KEY
from dpeft.methods.prompt_tuning.encoder import PromptEmbedding
from dpeft.store import ADAPTER, ParamSpec

TASK_KEYS = ("prefix_task_cols", "prefix_task_rows")


def _normal_002(t: torch.Tensor) -> None:
    nn.init.normal_(t, mean=0.0, std=0.02)


class MultitaskPromptEmbedding(PromptEmbedding):
    """PEFT's `MultitaskPromptEmbedding`: the tensors ``embedding``, ``prefix_task_cols`` (tasks, tokens, ranks)
    and ``prefix_task_rows`` (tasks, ranks, token_dim), all saved as they are."""

    #: The second half of an encoder-decoder model's prompt is prepended to the decoder's inputs.
    decoder_prompt = True

    def __init__(self, config: MultitaskPromptTuningConfig) -> None:
        if config.prompt_tuning_init in SOURCE_INITS and config.prompt_tuning_init_state_dict_path is None:
            raise ValueError(
                f"prompt_tuning_init={config.prompt_tuning_init!r} needs prompt_tuning_init_state_dict_path (a "
                "source-task checkpoint)"
            )
        super().__init__(config)
        tasks, tokens, ranks = config.num_tasks, self.total_virtual_tokens, config.num_ranks
        self.specs += [
            ParamSpec(
                "prefix_task_cols",
                (tasks, tokens, ranks),
                ("prompt_encoder", ADAPTER, "prefix_task_cols"),
                _normal_002,
            ),
            ParamSpec(
                "prefix_task_rows",
                (tasks, ranks, config.token_dim),
                ("prompt_encoder", ADAPTER, "prefix_task_rows"),
                _normal_002,
            ),
        ]

    def after_allocation(self, p: dict[str, torch.Tensor], word_embeddings: nn.Module | None) -> None:
        init = self.config.prompt_tuning_init
        if init not in SOURCE_INITS:
            super().after_allocation(p, word_embeddings)  # TEXT or RANDOM, as prompt tuning
            return
        source = _read(self.config.prompt_tuning_init_state_dict_path)
        values = {"embedding": source[PROMPT_KEY]}
        if init != "ONLY_SOURCE_SHARED":
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if init == "AVERAGE_SOURCE_TASKS":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                task = self.config.prompt_tuning_init_task
                cols, rows = cols[task].unsqueeze(0), rows[task].unsqueeze(0)
            values.update(prefix_task_cols=cols, prefix_task_rows=rows)
        with torch.no_grad():
            for name, value in values.items():
                if tuple(value.shape) != tuple(p[name].shape):
                    raise ValueError(
                        f"source checkpoint's {name} has shape {tuple(value.shape)}, this adapter needs "
                        f"{tuple(p[name].shape)}"
                    )
                p[name].copy_(value)

    def prompt(
        self, p: dict[str, torch.Tensor], batch_size: int, task_ids: torch.Tensor | None = None, training: bool = False
    ) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("multitask prompt tuning needs task_ids (one task index per row) in forward/generate")
        task_ids = task_ids.to(p["embedding"].device)
        cols = p["prefix_task_cols"].index_select(0, task_ids)
        rows = p["prefix_task_rows"].index_select(0, task_ids)
        return p["embedding"].unsqueeze(0) * torch.matmul(cols, rows)

    def saved_state(self, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: p["embedding"].detach(), **{k: p[k].detach() for k in TASK_KEYS}}

    def load_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in (PROMPT_KEY, *TASK_KEYS) if k not in state]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing}; found keys: {sorted(state)[:5]}")
        return {"embedding": state[PROMPT_KEY], **{k: state[k] for k in TASK_KEYS}}


def _read(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"cannot read the source-task checkpoint {path!r}: {exc}") from exc
