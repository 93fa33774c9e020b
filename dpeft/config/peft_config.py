"""`PeftConfig`: the base of every method config, with JSON IO compatible with HF PEFT's `adapter_config.json`."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dpeft.config.atomic_file import publish_atomically

CONFIG_NAME = "adapter_config.json"

# Keys PEFT writes about the file rather than the adapter: kept and saved back, never warned about.
_METADATA_KEYS = frozenset({"peft_version"})

# peft_type value -> config class; filled by `dpeft.methods.register_method`, read by `PeftConfig.from_peft_type`.
_CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


class TaskType(str, enum.Enum):
    """The task a PEFT model is built for; selects the `PeftModel` subclass and the head that is saved."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def register_config_class(peft_type: str, config_cls: type[PeftConfig]) -> None:
    """Make `config_cls` the class that `adapter_config.json` files with this `peft_type` load into."""
    if peft_type in _CONFIG_CLASSES:
        raise ValueError(f"peft_type {peft_type!r} is already registered to {_CONFIG_CLASSES[peft_type].__name__}")
    _CONFIG_CLASSES[peft_type] = config_cls


def registered_peft_types() -> list[str]:
    return sorted(_CONFIG_CLASSES)


def _to_json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _to_json_value(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _to_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json_value(v) for v in value]
    return value


@dataclass
class PeftConfig:
    """Fields every adapter config has, named as in HF PEFT.

    Keys that this version of dpeft does not know (for instance ones written by a newer PEFT) are kept in
    `extra_fields`, written back on save, and reported once with a warning.
    """

    peft_type: str | None = field(default=None, metadata={"help": "The method: a registered peft_type value."})
    task_type: str | None = field(default=None, metadata={"help": "The task, one of TaskType's values."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether the adapter is loaded for inference."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model the adapter is for."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    auto_mapping: dict | None = field(default=None, metadata={"help": "Kept for PEFT compatibility."})

    PEFT_TYPE: ClassVar[str | None] = None
    """The peft_type value of the subclass; set by each method's config class."""

    def __post_init__(self) -> None:
        if self.PEFT_TYPE is not None:
            self.peft_type = self.PEFT_TYPE
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            valid = ", ".join(TaskType._value2member_map_)
            raise ValueError(f"task_type={self.task_type!r} is not a known task type; use one of: {valid}")
        if not hasattr(self, "extra_fields"):
            self.extra_fields: dict[str, Any] = {}

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it: every field, enums as strings, sets as sorted lists, plus kept extras."""
        out = {f.name: _to_json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.update(self.extra_fields)
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `adapter_config.json` into `save_directory` (created if missing)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update(kwargs)
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"

        def write(fd: int) -> None:
            with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
                f.write(text)

        publish_atomically(os.path.join(save_directory, CONFIG_NAME), write)  # never a half-written config

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """Build the config of the registered method named by `kwargs['peft_type']`."""
        peft_type = kwargs.get("peft_type")
        if peft_type is None:
            raise ValueError(
                f"the config has no 'peft_type'; it must name the method, one of: {', '.join(registered_peft_types())}"
            )
        peft_type = peft_type.value if isinstance(peft_type, enum.Enum) else peft_type
        config_cls = _CONFIG_CLASSES.get(peft_type)
        if config_cls is None:
            raise ValueError(
                f"unknown peft_type {peft_type!r}; this dpeft knows: {', '.join(registered_peft_types())}"
            )
        return config_cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build from a dict; unknown keys are kept in `extra_fields` with a warning, never fatal."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        known.pop("peft_type", None)
        config = cls(**known)
        if unknown:
            # Drop keys PEFT writes that carry only default-valued features dpeft does not implement.
            significant = {
                k for k, v in unknown.items() if k not in _METADATA_KEYS and v not in (None, False, {}, [], "")
            }
            if significant:
                warnings.warn(
                    f"{cls.__name__}: keeping unknown config keys {sorted(significant)} (written by a newer PEFT?); "
                    "they are saved back unchanged but dpeft does not act on them",
                    stacklevel=2,
                )
            config.extra_fields = unknown
        return config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> dict[str, Any]:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); save the adapter config again") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of config fields, not {type(data).__name__}")
        return data

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Load `adapter_config.json` from a local directory (dpeft never reaches a model hub)."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise ValueError(
                f"no {CONFIG_NAME} in {path!r}; pass the local directory that save_pretrained wrote "
                "(dpeft does not download from a model hub)"
            )
        data = cls.from_json_file(config_file)
        data.update(kwargs)
        if cls is PeftConfig or cls.PEFT_TYPE is None:
            return PeftConfig.from_peft_type(**data)
        if data.get("peft_type", cls.PEFT_TYPE) != cls.PEFT_TYPE:
            raise ValueError(f"{config_file} holds a {data['peft_type']} config, not {cls.PEFT_TYPE}")
        return cls.from_dict(data)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """Build a method config from a dict that names its `peft_type` (as in HF PEFT)."""
    return PeftConfig.from_peft_type(**config_dict)
