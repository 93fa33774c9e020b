"""The `sharded` store backend at W=2 against HF PEFT + torch DDP at W=2, side by side in one run.

    python benchmarks/bench_sharded.py            # both sizes; prints a markdown table and writes --json

Two gloo CPU ranks (one thread each) train tiny Llamas (hidden 512 / 4 layers and hidden 1024 / 8 layers, LoRA
r=16 on all linear layers, AdamW) on the same global batch, each rank taking half of it. Steps of the two setups
alternate (ABAB...) so machine noise hits both alike; the figures are medians. Per-rank bytes are adapter
parameters + gradients + optimizer state held by one rank after `optimizer.step()` with gradients still set;
W=1 and W=4 for dpeft follow from the same dim-0 split the backend uses (`ShardLayout`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time
import warnings

import torch
import torch.multiprocessing as mp

SIZES = {"h512-l4": (512, 4, 1376), "h1024-l8": (1024, 8, 2752)}
VOCAB, SEQ = 1024, 64


def build_base(hidden: int, layers: int, inter: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(cfg)


def _bytes_full(params, optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for p in params:
        total += sum(v.numel() * v.element_size() for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    return total


def _predicted_bytes(shapes: list[tuple[int, ...]], world: int) -> int:
    """Per-rank bytes of rank 0 (the largest shard) at `world`: fp32 param, grad, exp_avg, exp_avg_sq + step."""
    from dpeft.store.sharded import ShardLayout

    elems = sum(ShardLayout.of(s, 0, world).rows * ShardLayout(s, 0, 0, 0).row_numel for s in shapes)
    return elems * 4 * 4 + len(shapes) * 4


def _setups(size: str, rank: int, world: int):
    import peft
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dpeft

    hidden, layers, inter = SIZES[size]
    base = build_base(hidden, layers, inter)
    twin = copy.deepcopy(base)
    ours = dpeft.get_peft_model(base, dpeft.LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    ours.store.shard()
    ours_opt = torch.optim.AdamW(ours.store.optimizer_parameters(), lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(twin, peft.LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    their_params = [p for p in theirs.parameters() if p.requires_grad]
    ddp = DDP(theirs)
    their_opt = torch.optim.AdamW(their_params, lr=1e-4)
    shapes = [shape for _, shape, _ in ours.store.param_keys().values()]
    return (ours, ours_opt), (ddp, their_opt, their_params), shapes


def _step(model, optimizer, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _rank_main(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(args.threads)
    from dpeft.dist import barrier, destroy_distributed, init_distributed
    from dpeft.store.sharded import adapter_state_bytes

    init_distributed("cpu")
    results = {}
    for size in args.sizes:
        (ours, ours_opt), (ddp, their_opt, their_params), shapes = _setups(size, rank, world)
        times = {"dpeft-sharded": [], "peft-ddp": []}
        gen = torch.Generator().manual_seed(0)
        for i in range(args.warmup + args.steps):
            ids = torch.randint(0, VOCAB, (args.batch, SEQ), generator=gen).chunk(world)[rank]
            barrier()
            t_ours = _step(ours, ours_opt, ids)
            barrier()
            t_theirs = _step(ddp, their_opt, ids)
            if i >= args.warmup:
                times["dpeft-sharded"].append(t_ours)
                times["peft-ddp"].append(t_theirs)
            if i == args.warmup + args.steps - 1:
                bytes_ours = adapter_state_bytes(ours.store, ours_opt)["total"]
                bytes_theirs = _bytes_full(their_params, their_opt)
            ours_opt.zero_grad()
            their_opt.zero_grad()
        results[size] = {
            "times": times,
            "bytes": {"dpeft-sharded": bytes_ours, "peft-ddp": bytes_theirs},
            "predicted": {w: _predicted_bytes(shapes, w) for w in (1, 2, 4)},
        }
        del ours, ddp
    queue.put((rank, json.dumps(results)))
    destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    per_rank = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    return {r: json.loads(v) for r, v in per_rank.items()}


def summarize(per_rank: dict) -> dict:
    out = {}
    for size in per_rank[0]:
        # a step ends when the slower rank ends it
        med = {
            k: statistics.median(max(vals) for vals in zip(*(per_rank[r][size]["times"][k] for r in per_rank)))
            for k in per_rank[0][size]["times"]
        }
        ours_b = max(per_rank[r][size]["bytes"]["dpeft-sharded"] for r in per_rank)
        theirs_b = max(per_rank[r][size]["bytes"]["peft-ddp"] for r in per_rank)
        out[size] = {
            "median_step_s": med,
            "ratio": med["dpeft-sharded"] / med["peft-ddp"],
            "bytes_per_rank": {"dpeft-sharded": ours_b, "peft-ddp": theirs_b},
            "dpeft_predicted_bytes": per_rank[0][size]["predicted"],
        }
    return out


def table(summary: dict) -> str:
    lines = [
        "| model | dpeft sharded W=2 step (s) | PEFT+DDP W=2 step (s) | ratio | bytes/rank dpeft W=2 | "
        "bytes/rank PEFT+DDP | dpeft W=1 / W=2 / W=4 (layout) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, s in summary.items():
        m, b, p = s["median_step_s"], s["bytes_per_rank"], s["dpeft_predicted_bytes"]
        lines.append(
            f"| {size} | {m['dpeft-sharded']:.3f} | {m['peft-ddp']:.3f} | {s['ratio']:.3f}x | "
            f"{b['dpeft-sharded']:,} | {b['peft-ddp']:,} | {p['1']:,} / {p['2']:,} / {p['4']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences of 64 tokens)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", default="benchmarks/results_sharded.json")
    args = parser.parse_args(argv)
    summary = summarize(run(args))
    print(table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
