"""The six task classes of HF PEFT. For adapter methods they differ only in which head they save and in
`generate`; prompt-learning methods add virtual tokens to the inputs as `_prompt_task` says (`dpeft.model.prompt`)."""

from __future__ import annotations

from dpeft.config import TaskType
from dpeft.model.peft_model import PeftModel


class PeftModelForCausalLM(PeftModel):
    """Causal language models; `generate` accepts `adapter_names` for mixed-adapter batches."""

    _prompt_task = "causal"

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language models."""

    _prompt_task = "seq2seq"


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classifiers; the classification head (`classifier` or `score`) is trained and saved in full."""

    _prompt_task = "classification"

    head_module_names = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    """Token classifiers; the classification head is trained and saved in full."""

    _prompt_task = "classification"

    head_module_names = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering; the `qa_outputs` head is trained and saved in full."""

    _prompt_task = "classification"

    head_module_names = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """Embedding models (hidden states as features)."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def task_model_class(task_type: str | None) -> type[PeftModel]:
    """The PeftModel class for a task type (plain `PeftModel` when it is None)."""
    if task_type is None:
        return PeftModel
    key = getattr(task_type, "value", task_type)
    if key not in MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
        raise ValueError(f"unknown task_type {key!r}; use one of {list(MODEL_TYPE_TO_PEFT_MODEL_MAPPING)}")
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING[key]
