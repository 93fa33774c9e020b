"""`MultitaskPromptTuningConfig`: HF PEFT's multitask prompt-tuning config fields and defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from dpeft.methods.prompt_tuning.config import PromptTuningConfig


class MultitaskPromptTuningInit(str, enum.Enum):
    """How the shared prompt and the task factors start: randomly, from a text, or from a source-task checkpoint."""

    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


#: Inits that read `prompt_tuning_init_state_dict_path`.
SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Configuration of multitask prompt tuning: a shared prompt scaled elementwise by a rank-`num_ranks`
    task-specific matrix (``prefix_task_cols[t] @ prefix_task_rows[t]``)."""

    prompt_tuning_init: str = field(
        default=MultitaskPromptTuningInit.RANDOM.value,
        metadata={"help": "TEXT, RANDOM, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED."},
    )
    prompt_tuning_init_state_dict_path: str | None = field(
        default=None, metadata={"help": "Source-task checkpoint (safetensors or torch) of the source inits."}
    )
    prompt_tuning_init_task: int | None = field(default=0, metadata={"help": "Source task of EXACT_SOURCE_TASK."})
    num_ranks: int | None = field(default=1, metadata={"help": "Rank of each task's scaling matrix."})
    num_tasks: int | None = field(default=1, metadata={"help": "Number of tasks."})

    PEFT_TYPE: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_ranks", "num_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

    @classmethod
    def _init_enum(cls) -> type[enum.Enum]:
        return MultitaskPromptTuningInit
