"""Per-layer cost of OFT, BOFT, HRA and DeLoRA in dpeft against HF PEFT: one adapted nn.Linear, fwd+bwd.

Run: python benchmarks/bench_orthogonal.py [--dim 1024] [--tokens 512] [--repeats 15] [--methods oft,boft,hra,delora]
Prints per method the median seconds of a forward + backward of the adapted layer in each library and the median of
the per-round ratios dpeft / PEFT (lower is better), rounds interleaved so that load from other processes hits both
alike; also each library's cost over the frozen layer alone. Float32, CPU, one thread, process CPU time.

Where the time goes: PEFT builds a dim x dim matrix per forward for BOFT (x @ M) and HRA (the product of r
reflections, then W H: dim^3 flops), dpeft applies the blocks / reflections to the activations instead.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

CONFIGS = {
    "oft": lambda lib: lib.OFTConfig(target_modules=["0"], oft_block_size=32, init_weights=False),
    "boft": lambda lib: lib.BOFTConfig(target_modules=["0"], boft_block_size=32, init_weights=False),
    "hra": lambda lib: lib.HRAConfig(target_modules=["0"], r=8, init_weights=False),
    "delora": lambda lib: lib.DeloraConfig(target_modules=["0"], r=8, init_weights=False),
}


def _layer(dim: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, dim))


def _time(model: nn.Module, x: torch.Tensor) -> float:
    # Process CPU time with one thread: other processes on the shared machine disturb it far less than wall time.
    start = time.process_time()
    model(x).square().mean().backward()
    return time.process_time() - start


def interleaved_times(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[list[float]]:
    """Each model's fwd+bwd times over `repeats` rounds (2 warm-up rounds dropped), the models alternating within a
    round so that load from other processes hits all of them alike."""
    times: list[list[float]] = [[] for _ in models]
    for i in range(repeats + 2):
        for model, samples in zip(models, times):
            t = _time(model, x)
            if i >= 2:  # warm-up rounds excluded
                samples.append(t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--methods", default=",".join(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import peft

    import dpeft

    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    print(f"{'method':8} {'dpeft ms':>9} {'peft ms':>9} {'ratio':>6} {'dpeft/base':>10} {'peft/base':>9}")
    for name in args.methods.split(","):
        base = _layer(args.dim).requires_grad_(False)
        models = [base, dpeft.get_peft_model(_layer(args.dim), CONFIGS[name](dpeft))]
        models.append(peft.get_peft_model(_layer(args.dim), CONFIGS[name](peft)))
        times = interleaved_times(models, x, args.repeats)
        ratios = [a / b for a, b in zip(times[1], times[2])]
        base_t, ours, theirs = (statistics.median(t) for t in times)
        print(
            f"{name:8} {ours * 1e3:9.2f} {theirs * 1e3:9.2f} {statistics.median(ratios):6.3f} "
            f"{ours / base_t:10.2f} {theirs / base_t:9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
