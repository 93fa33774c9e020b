"""QLoRA vs LoRA on a float base: peak memory and train-step time for the same tiny Llama, side by side.

    python benchmarks/bench_qlora.py                 # fp32 / nf4 / int8 bases, LoRA r=16 on all linear layers
    python benchmarks/bench_qlora.py --steps 20 --hidden 768

Each base runs in its own subprocess so that its memory figures are its own:
- ``weights_MB``: bytes of the model's parameters and buffers (4-bit: packed weights plus quantization state);
- ``peak_rss_MB``: the process's peak resident memory during the training steps only, above the resident memory
  before them (Linux: the peak is reset through /proc/self/clear_refs after the model is built, so building the
  float model before quantizing it does not count), i.e. activations, gradients, optimizer state and
  dequantization buffers;
- ``step_ms``: median wall time of one forward + backward + AdamW step (after warm-up steps).
On CUDA (``--device cuda``) ``peak_rss_MB`` is replaced by ``torch.cuda.max_memory_allocated`` over the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

BASES = ("float32", "nf4", "int8")


def _tensor_bytes(model) -> int:
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:  # 4-bit absmax (and its nested quantization), code book
            for v in state.as_dict(packed=False).values():
                total += v.numel() * v.element_size() if hasattr(v, "numel") else 0
        scb = getattr(t, "SCB", None)
        total += scb.numel() * scb.element_size() if scb is not None else 0
    return total


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(args: argparse.Namespace, base: str) -> dict:
    """Build the model for `base`, train `args.steps` steps and return the figures (runs in a subprocess)."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dpeft
    from dpeft.quant import quantize_linear_layers

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(cfg).to(device)
    if base != "float32":
        quantize_linear_layers(model, 4 if base == "nf4" else 8, quant_type="nf4", compute_dtype=torch.float32)
        model = dpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = dpeft.get_peft_model(
        model, dpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    ).train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    weights = _tensor_bytes(peft_model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _rss_mb("VmRSS:")
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _rss_mb("VmHWM:") - before
    return {
        "base": base,
        "weights_MB": weights / 2**20,
        "peak_step_MB": peak,
        "step_ms": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    parser.add_argument("--one", choices=BASES, help=argparse.SUPPRESS)  # the subprocess entry
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return
    rows = []
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--bases")]
    for base in args.bases:
        cmd = [sys.executable, __file__, *_strip_bases(passthrough), "--one", base]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = rows[0]
    print(
        f"LoRA r=16 all-linear, Llama hidden={args.hidden} layers={args.layers}, batch {args.batch}x{args.seq}, "
        f"{args.steps} steps, device={args.device}, threads={args.threads}"
    )
    print(f"{'base':8} {'weights_MB':>10} {'peak_step_MB':>12} {'step_ms(med)':>12} {'vs ' + ref['base']:>12}")
    for r in rows:
        print(
            f"{r['base']:8} {r['weights_MB']:10.1f} {r['peak_step_MB']:12.1f} {r['step_ms']:12.1f} "
            f"{r['step_ms'] / ref['step_ms']:11.2f}x"
        )
    print(json.dumps(rows))


def _strip_bases(argv: list[str]) -> list[str]:
    """argv without ``--bases a b c`` (the parent runs each base itself)."""
    out, skip = [], False
    for a in argv:
        if a == "--bases":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
