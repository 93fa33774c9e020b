"""AdaLoRA train step (forward with the orthogonal regulariser, backward, AdamW, `update_and_allocate`) and
inference forward in dpeft against HF PEFT, same model, config and batch.

Run: python benchmarks/bench_adalora.py [--steps 20]
Prints the median seconds per step of both libraries, measured with their steps alternating (so load from other
processes hits both alike), and the ratio dpeft / PEFT (lower is better). Model: a small llama (2 layers, hidden
128) built from a config; AdaLoRA on q/k/v/o and the MLP, init_r 12 -> target_r 8; batch 4 x 64 tokens, float32.
The schedule is stretched (total_step 10_000, tinit 0) so every timed step allocates (masks) ranks.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from bench_methods import _compare, _model  # the same small llama and timing as the other method benchmarks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(lib):
    return lib.AdaLoraConfig(target_modules=TARGETS, init_r=12, target_r=8, total_step=10_000, task_type="CAUSAL_LM")


def _allocate(model, step: int) -> None:
    model.base_model.update_and_allocate(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import peft

    import dpeft

    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    print(f"{'mode':6} {'dpeft s':>9} {'peft s':>9} {'ratio':>6}")
    for train in (True, False):
        ours = dpeft.get_peft_model(_model(), _config(dpeft))
        theirs = peft.get_peft_model(_model(), _config(peft))
        t_ours, t_theirs = _compare(ours, theirs, ids, args.steps, train, lr=1e-3, after_step=_allocate)
        mode = "train" if train else "infer"
        print(f"{mode:6} {t_ours:9.4f} {t_theirs:9.4f} {t_ours / t_theirs:6.3f}", flush=True)


if __name__ == "__main__":
    main()
