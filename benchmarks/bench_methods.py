"""Train-step and inference-forward time of each non-LoRA method in dpeft against HF PEFT, same model and config.

Run: python benchmarks/bench_methods.py [--steps 20] [--methods ia3,loha,lokr,fourierft,ln_tuning]
Prints per method the median seconds per step for both libraries and the ratio dpeft / PEFT (lower is better).
The model is a small llama (2 layers, hidden 128) built from a config, batch 4 x 64 tokens, float32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

CONFIGS = {
    "ia3": lambda lib: lib.IA3Config(task_type="CAUSAL_LM"),
    "loha": lambda lib: lib.LoHaConfig(target_modules=["q_proj", "v_proj"], r=8, task_type="CAUSAL_LM"),
    "lokr": lambda lib: lib.LoKrConfig(target_modules=["q_proj", "v_proj"], r=8, task_type="CAUSAL_LM"),
    "fourierft": lambda lib: lib.FourierFTConfig(
        target_modules=["q_proj", "v_proj"], n_frequency=1000, task_type="CAUSAL_LM"
    ),
    "ln_tuning": lambda lib: lib.LNTuningConfig(task_type="CAUSAL_LM"),
    "oft": lambda lib: lib.OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=32, task_type="CAUSAL_LM"),
    "boft": lambda lib: lib.BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=8, task_type="CAUSAL_LM"),
    "hra": lambda lib: lib.HRAConfig(target_modules=["q_proj", "v_proj"], r=8, task_type="CAUSAL_LM"),
    "delora": lambda lib: lib.DeloraConfig(target_modules=["q_proj", "v_proj"], r=8, task_type="CAUSAL_LM"),
    # Shared-basis and structured methods (vera, vblora and randlora read model-level shared tensors in every layer).
    "vera": lambda lib: lib.VeraConfig(target_modules=["q_proj", "v_proj"], r=64, task_type="CAUSAL_LM"),
    "vblora": lambda lib: lib.VBLoRAConfig(
        target_modules=["q_proj", "v_proj"], r=4, num_vectors=64, vector_length=32, task_type="CAUSAL_LM"
    ),
    "randlora": lambda lib: lib.RandLoraConfig(target_modules=["q_proj", "v_proj"], r=16, task_type="CAUSAL_LM"),
    "c3a": lambda lib: lib.C3AConfig(target_modules=["q_proj", "v_proj"], block_size=32, task_type="CAUSAL_LM"),
    "shira": lambda lib: lib.ShiraConfig(target_modules=["q_proj", "v_proj"], r=8, task_type="CAUSAL_LM"),
}


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def _step(model, optimizer, ids: torch.Tensor, step: int, train: bool, after_step=None) -> float:
    start = time.perf_counter()
    if train:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if after_step is not None:  # e.g. AdaLoRA's update_and_allocate: after the step, before zero_grad
            after_step(model, step)
        optimizer.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(input_ids=ids)
    return time.perf_counter() - start


def _compare(
    ours, theirs, ids: torch.Tensor, steps: int, train: bool, lr: float = 1e-4, after_step=None
) -> tuple[float, float]:
    """Median step times, the two libraries' steps alternating so that load from other processes hits both alike."""
    runs = []
    for model in (ours, theirs):
        model.train(train)
        params = [p for p in model.parameters() if p.requires_grad]
        runs.append((model, torch.optim.AdamW(params, lr=lr), []))
    for i in range(steps + 2):
        for model, optimizer, times in runs:
            t = _step(model, optimizer, ids, i, train, after_step)
            if i >= 2:  # warm-up steps excluded
                times.append(t)
    return statistics.median(runs[0][2]), statistics.median(runs[1][2])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default=",".join(CONFIGS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import peft

    import dpeft

    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    print(f"{'method':10} {'mode':6} {'dpeft s':>9} {'peft s':>9} {'ratio':>6}")
    for name in args.methods.split(","):
        for train in (True, False):
            ours = dpeft.get_peft_model(_model(), CONFIGS[name](dpeft))
            theirs = peft.get_peft_model(_model(), CONFIGS[name](peft))
            t_ours, t_theirs = _compare(ours, theirs, ids, args.steps, train)
            mode = "train" if train else "infer"
            print(f"{name:10} {mode:6} {t_ours:9.4f} {t_theirs:9.4f} {t_ours / t_theirs:6.3f}", flush=True)


if __name__ == "__main__":
    main()
