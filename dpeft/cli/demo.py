"""`dpeft demo`: a short, real LoRA run on a tiny Llama built from a config (no downloads).

It prints the trainable parameters, trains a few steps on a copy task, saves the adapter in PEFT's format,
loads it back onto a fresh base, checks the outputs agree, merges it and checks again.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch


def build_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def run_demo(steps: int = 30, rank: int = 8, out_dir: str | None = None) -> dict[str, float]:
    """Run the demo and return its figures (first/last loss, reload and merge differences)."""
    from dpeft import LoraConfig, PeftModel, TaskType, get_peft_model

    base = build_tiny_llama()
    pristine = copy.deepcopy(base)
    model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)
    )
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (8, 16), generator=generator)  # a fixed batch the adapter learns to predict
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f}s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    model.eval()
    probe = torch.randint(0, 128, (2, 16), generator=generator)
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    with tempfile.TemporaryDirectory() as tmp:
        directory = out_dir or tmp
        model.save_pretrained(directory)
        print(f"saved adapter_config.json + adapter_model.safetensors to {directory}")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(pristine), directory)
    with torch.no_grad():
        reload_diff = (reloaded(input_ids=probe).logits - expected).abs().max().item()
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(input_ids=probe).logits - expected).abs().max().item()
    print(f"reloaded adapter: max |logit difference| = {reload_diff:.2e}")
    print(f"merged into the base ({type(merged).__name__}): max |logit difference| = {merge_diff:.2e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "reload_diff": reload_diff, "merge_diff": merge_diff}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="A short LoRA run on a tiny Llama: train, save, reload, merge.")
    parser.add_argument("--steps", type=int, default=30, help="Training steps.")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--out-dir", default=None, help="Where to save the adapter (default: a temporary folder).")
    parser.set_defaults(func=lambda args: run_demo(args.steps, args.rank, args.out_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    args.func(args)
