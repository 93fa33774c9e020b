"""Target matching, injection, `PeftModel` and its task classes."""

from dpeft.model.layer import AdaptedLayer
from dpeft.model.modules_to_save import ModulesToSaveWrapper
from dpeft.model.peft_model import PeftModel
from dpeft.model.state import get_peft_model_state_dict, set_peft_model_state_dict
from dpeft.model.targets import DEFAULT_TARGET_MODULES
from dpeft.model.task_models import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    task_model_class,
)
from dpeft.model.tuner import AdapterModel

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AdaptedLayer",
    "AdapterModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "task_model_class",
]
