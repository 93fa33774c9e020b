"""dpeft: distributed-first parameter-efficient fine-tuning with HF PEFT's API and checkpoint format.

`import dpeft as peft` works for code written against PEFT's public API on the methods dpeft has.
"""

from dpeft.api import get_peft_model, inject_adapter_in_model
from dpeft.config import PeftConfig, TaskType, get_peft_config
from dpeft.methods import PeftType, registered_methods
from dpeft.methods.adalora import AdaLoraConfig
from dpeft.methods.boft import BOFTConfig
from dpeft.methods.c3a import C3AConfig
from dpeft.methods.delora import DeloraConfig
from dpeft.methods.fourierft import FourierFTConfig
from dpeft.methods.hra import HRAConfig
from dpeft.methods.ia3 import IA3Config
from dpeft.methods.ln_tuning import LNTuningConfig
from dpeft.methods.loha import LoHaConfig
from dpeft.methods.lokr import LoKrConfig
from dpeft.methods.lora import LoraConfig
from dpeft.methods.miss import MissConfig
from dpeft.methods.multitask_prompt_tuning import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from dpeft.methods.oft import OFTConfig
from dpeft.methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from dpeft.methods.poly import PolyConfig
from dpeft.methods.prefix_tuning import PrefixTuningConfig
from dpeft.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
from dpeft.methods.randlora import RandLoraConfig
from dpeft.methods.shira import ShiraConfig
from dpeft.methods.vblora import VBLoRAConfig
from dpeft.methods.vera import VeraConfig
from dpeft.model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from dpeft.quant.prepare import prepare_model_for_kbit_training
from dpeft.store import AdapterStore

__version__ = "0.1.0"

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "AdaLoraConfig",
    "AdapterStore",
    "BOFTConfig",
    "C3AConfig",
    "DeloraConfig",
    "FourierFTConfig",
    "HRAConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MissConfig",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "RandLoraConfig",
    "PolyConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "ShiraConfig",
    "TaskType",
    "VBLoRAConfig",
    "VeraConfig",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "registered_methods",
    "set_peft_model_state_dict",
]
