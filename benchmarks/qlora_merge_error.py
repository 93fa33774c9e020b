"""How much merging onto a quantized base costs: output error of each `quantized_merge` policy on a tiny Llama.

    python benchmarks/qlora_merge_error.py

For a LoRA/DoRA adapter on q/v/down projections (B starts at zero, then every adapter tensor gets N(0, noise^2)
noise, a stand-in for a trained adapter), prints relative output errors (||y - y_ref|| / ||y_ref||, train mode so
bnb 8-bit matmuls are exact):
- base_quant_err: quantized base vs the float base it came from (what quantizing costs in the first place);
- adapter_effect: adapted vs quantized base (how much the adapter changes the output);
- requantize_err / dequantize_err: merged model of each policy vs the unmerged adapted model.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dpeft
from dpeft.quant import quantize_linear_layers


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).train()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def main() -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = tiny_llama()(input_ids=ids).logits
    for bits in (4, 8):
        base = quantize_linear_layers(tiny_llama(), bits, quant_type="nf4", compute_dtype=torch.float32)
        base_out = base(input_ids=ids).logits
        for use_dora in (False, True):
            for noise in (0.005, 0.02):
                config = dpeft.LoraConfig(
                    r=4,
                    lora_alpha=8,
                    target_modules=["q_proj", "v_proj", "down_proj"],
                    use_dora=use_dora,
                    task_type="CAUSAL_LM",
                )
                model = dpeft.get_peft_model(copy.deepcopy(base), config).train()
                g = torch.Generator().manual_seed(0)
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(noise * torch.randn(p.shape, generator=g))
                y = model(input_ids=ids).logits
                errs = {}
                for policy in ("requantize", "dequantize"):
                    merged = copy.deepcopy(model).merge_and_unload(quantized_merge=policy).train()
                    errs[policy] = rel(merged(input_ids=ids).logits, y)
                name = f"{'nf4' if bits == 4 else 'int8'} {'dora' if use_dora else 'lora'}"
                print(
                    f"{name:9} noise={noise:<5} base_quant_err={rel(base_out, ref):.4f} "
                    f"adapter_effect={rel(y, base_out):.4f} requantize_err={errs['requantize']:.4f} "
                    f"dequantize_err={errs['dequantize']:.1e}"
                )


if __name__ == "__main__":
    main()
