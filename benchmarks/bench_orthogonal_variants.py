"""Constrained OFT and several active BOFT / HRA adapters, dpeft against HF PEFT: one adapted nn.Linear, fwd+bwd.

Run: python benchmarks/bench_orthogonal_variants.py [--dim 1024] [--tokens 512] [--repeats 15]
Same measurement as bench_orthogonal.py (process CPU time, one thread, rounds interleaved, median of per-round
ratios dpeft / PEFT). Rows: OFT with coft=True (every forward first projects the rotation blocks and writes them
back, in both libraries), and two BOFT / HRA adapters active at once (`set_adapter(["default", "b"])`: PEFT
multiplies dense dim x dim rotations; dpeft merges the weight with each adapter in turn, W-sized work).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_orthogonal import _layer, interleaved_times  # noqa: E402

VARIANTS = {
    "oft": (lambda lib: lib.OFTConfig(target_modules=["0"], oft_block_size=32, init_weights=False), 1),
    "oft-coft": (
        lambda lib: lib.OFTConfig(target_modules=["0"], oft_block_size=32, init_weights=False, coft=True, eps=1e-3),
        1,
    ),
    "boft-x2": (lambda lib: lib.BOFTConfig(target_modules=["0"], boft_block_size=32, init_weights=False), 2),
    "hra-x2": (lambda lib: lib.HRAConfig(target_modules=["0"], r=8, init_weights=False), 2),
}


def _model(lib, dim: int, name: str):
    make, n_adapters = VARIANTS[name]
    model = lib.get_peft_model(_layer(dim), make(lib))
    if n_adapters > 1:
        model.add_adapter("b", make(lib))
        model.base_model.set_adapter(["default", "b"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import peft

    import dpeft

    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    print(f"{'variant':9} {'dpeft ms':>9} {'peft ms':>9} {'ratio':>6}")
    for name in args.variants.split(","):
        models = [_model(dpeft, args.dim, name), _model(peft, args.dim, name)]
        times = interleaved_times(models, x, args.repeats)
        ratios = [a / b for a, b in zip(*times)]
        ours, theirs = (statistics.median(t) for t in times)
        print(f"{name:9} {ours * 1e3:9.2f} {theirs * 1e3:9.2f} {statistics.median(ratios):6.3f}", flush=True)


if __name__ == "__main__":
    main()
