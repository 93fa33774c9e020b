"""Adapter configs (PEFT's JSON format) and, later, run configs."""

from dpeft.config.peft_config import (
    CONFIG_NAME,
    PeftConfig,
    TaskType,
    get_peft_config,
    register_config_class,
    registered_peft_types,
)
from dpeft.config.targets import TargetConfigMixin

__all__ = [
    "CONFIG_NAME",
    "PeftConfig",
    "TargetConfigMixin",
    "TaskType",
    "get_peft_config",
    "register_config_class",
    "registered_peft_types",
]
