"""dpeft's store backends against HF PEFT under the same engines, on 2 gloo CPU ranks, side by side in one run.

    python benchmarks/bench_backends.py                       # both sizes; markdown table, --json results
    python benchmarks/bench_backends.py --sizes h512-l4 --steps 4 --warmup 1   # quicker
    python benchmarks/bench_backends.py --sizes h1024-l8 \
        --setups dpeft-sharded peft-ddp dpeft-zero2 peft-zero2 dpeft-zero3 peft-zero3   # the ZeRO rows

Setups (each a function registered in `SETUPS`; more engines add theirs with `@setup("name", engine="...")`):
dpeft local (plain parameters, gradients all-reduced like DDP), dpeft sharded, dpeft fsdp2 (`apply_fsdp`), HF PEFT
+ DDP and HF PEFT + FSDP2 (`fully_shard` per decoder layer, then the root, as PEFT's docs do it), and DeepSpeed
ZeRO-2 and ZeRO-3 for both libraries (dpeft through `apply_deepspeed`, PEFT through a plain `deepspeed.initialize`
over its trainable tensors; DeepSpeed's default config otherwise). Same tiny Llamas
(hidden 512 / 4 layers and hidden 1024 / 8 layers, LoRA r=16 on all linear layers, AdamW), same global batch, each
rank taking half.

Step time: one process per rank builds every setup and runs their steps interleaved (A B C D E, A B C ...), a
barrier before each, so machine noise hits all alike; a step ends when the slower rank ends it; medians over the
timed steps, ratios of medians (dpeft fsdp2 / PEFT FSDP2 is the issue's target, dpeft local and sharded / PEFT DDP).
Memory: a fresh pair of ranks per setup (peak RSS only grows, so setups cannot share a process) builds it and runs
two steps per size, smallest size first; reported is the growth of the rank's peak RSS (`ru_maxrss`) over the
process after `import torch, transformers, peft` and the process group, max over ranks.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sharded import SEQ, SIZES, VOCAB, _free_port, build_base  # noqa: E402 - the same models as bench_sharded


@dataclass
class Setup:
    """One contender, built on this rank: `step(ids)` runs forward, backward and the optimizer step."""

    step: Callable[[torch.Tensor], None]
    engine: str  # which PEFT setup it is compared with: "ddp", "fsdp2", "zero3", ...


SETUPS: dict[str, tuple[Callable[[torch.nn.Module], Setup], str]] = {}


def setup(name: str, engine: str):
    """Register a setup builder ``fn(base_model) -> Setup`` under `name` (run on every rank, in a process group)."""

    def register(fn):
        SETUPS[name] = (fn, engine)
        return fn

    return register


def _lora(lib):
    return lib.LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")


def _plain_step(model, optimizer, after_backward=None) -> Callable[[torch.Tensor], None]:
    def step(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _dpeft(base, backend: str) -> Setup:
    import dpeft
    from dpeft.dist import all_reduce_grads
    from dpeft.dist.fsdp import apply_fsdp

    model = dpeft.get_peft_model(base, _lora(dpeft))
    if backend == "sharded":
        model.store.shard()
    elif backend == "fsdp2":
        apply_fsdp(model)
    params = model.store.optimizer_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    reduce = (lambda: all_reduce_grads(params)) if backend == "local" else None
    return Setup(_plain_step(model, optimizer, reduce), "ddp" if backend != "fsdp2" else "fsdp2")


@setup("dpeft-local", engine="ddp")
def dpeft_local(base) -> Setup:
    return _dpeft(base, "local")


@setup("dpeft-sharded", engine="ddp")
def dpeft_sharded(base) -> Setup:
    return _dpeft(base, "sharded")


@setup("dpeft-fsdp2", engine="fsdp2")
def dpeft_fsdp2(base) -> Setup:
    return _dpeft(base, "fsdp2")


def _peft(base):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, _lora(peft))


@setup("peft-ddp", engine="ddp")
def peft_ddp(base) -> Setup:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _peft(base)
    params = [p for p in model.parameters() if p.requires_grad]
    return Setup(_plain_step(DDP(model), torch.optim.AdamW(params, lr=1e-4)), "ddp")


@setup("peft-fsdp2", engine="fsdp2")
def peft_fsdp2(base) -> Setup:
    from torch.distributed.fsdp import fully_shard

    model = _peft(base)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return Setup(_plain_step(model, torch.optim.AdamW(params, lr=1e-4)), "fsdp2")


def _deepspeed_step(model, stage: int, batch_rows: int) -> Callable[[torch.Tensor], None]:
    """DeepSpeed ZeRO-`stage` over `model` (dpeft's store or PEFT's trainable tensors): forward, backward, step."""
    from dpeft.dist.deepspeed import deepspeed_config, import_deepspeed, init_deepspeed_distributed

    init_deepspeed_distributed()
    config = deepspeed_config(stage, micro_batch_size=batch_rows)
    if hasattr(model, "store"):
        from dpeft.dist.deepspeed import apply_deepspeed

        params = model.store.optimizer_parameters()
        engine = apply_deepspeed(model, torch.optim.AdamW(params, lr=1e-4), config=config)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        engine = import_deepspeed().initialize(model=model, optimizer=opt, config=config)[0]

    def step(ids: torch.Tensor) -> None:
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    return step


def _zero(lib: str, stage: int):
    def build(base) -> Setup:
        import dpeft

        model = dpeft.get_peft_model(base, _lora(dpeft)) if lib == "dpeft" else _peft(base)
        return Setup(_deepspeed_step(model, stage, DEEPSPEED_ROWS), f"zero{stage}")

    return build


DEEPSPEED_ROWS = 2  # rows per rank per step: the default global batch of 4 over 2 ranks
for _stage in (2, 3):
    for _lib in ("dpeft", "peft"):
        setup(f"{_lib}-zero{_stage}", engine=f"zero{_stage}")(_zero(_lib, _stage))


# ---------------------------------------------------------------- ranks
def _init(rank: int, world: int, port: int, threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(threads)
    import peft  # noqa: F401 - imported before the memory baseline, like transformers
    import transformers  # noqa: F401

    from dpeft.dist import init_distributed

    init_distributed("cpu")


def _ids(gen: torch.Generator, batch: int, rank: int, world: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=gen).chunk(world)[rank]


def _time_rank(rank: int, world: int, port: int, args, queue) -> None:
    _init(rank, world, port, args.threads)
    from dpeft.dist import barrier, destroy_distributed

    results = {}
    for size in args.sizes:
        base = build_base(*SIZES[size])
        built = {name: SETUPS[name][0](copy.deepcopy(base)) for name in args.setups}
        del base
        times = {name: [] for name in built}
        gen = torch.Generator().manual_seed(0)
        for i in range(args.warmup + args.steps):
            ids = _ids(gen, args.batch, rank, world)
            for name, contender in built.items():
                barrier()
                start = time.perf_counter()
                contender.step(ids)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        results[size] = times
        del built
    queue.put((rank, json.dumps(results)))
    destroy_distributed()


def _memory_rank(rank: int, world: int, port: int, args, name: str, queue) -> None:
    _init(rank, world, port, args.threads)
    from dpeft.dist import destroy_distributed

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {}
    for size in sorted(args.sizes, key=lambda s: SIZES[s]):
        contender = SETUPS[name][0](build_base(*SIZES[size]))
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            contender.step(_ids(gen, args.batch, rank, world))
        out[size] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        del contender
    queue.put((rank, json.dumps(out)))
    destroy_distributed()


def _spawn(target, *args) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    per_rank = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    return {r: json.loads(v) for r, v in per_rank.items()}


# ---------------------------------------------------------------- report
def summarize(times: dict[int, dict], memory: dict[str, dict[int, dict]]) -> dict:
    out = {}
    for size in times[0]:
        med = {
            name: statistics.median(max(vals) for vals in zip(*(times[r][size][name] for r in times)))
            for name in times[0][size]
        }
        peft_of = {SETUPS[n][1]: n for n in med if n.startswith("peft-")}
        out[size] = {
            "median_step_s": med,
            "ratio_vs_peft_same_engine": {
                n: med[n] / med[peft_of[SETUPS[n][1]]]
                for n in med
                if not n.startswith("peft-") and SETUPS[n][1] in peft_of
            },
            "peak_rss_growth_bytes": {n: max(m[r][size] for r in m) for n, m in memory.items()},
        }
    return out


def table(summary: dict) -> str:
    lines = [
        "| model | setup | engine | median step (s) | / PEFT same engine | peak RSS growth per rank (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for size, s in summary.items():
        for name, t in s["median_step_s"].items():
            ratio = s["ratio_vs_peft_same_engine"].get(name)
            rss = s["peak_rss_growth_bytes"].get(name)
            lines.append(
                f"| {size} | {name} | {SETUPS[name][1]} | {t:.3f} | {f'{ratio:.3f}x' if ratio else ''} | "
                f"{f'{rss / 2**20:.0f}' if rss is not None else ''} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences of 64 tokens)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-setup memory runs")
    parser.add_argument("--json", default="benchmarks/results_backends.json")
    args = parser.parse_args(argv)
    times = _spawn(_time_rank, args)
    memory = {} if args.no_memory else {name: _spawn(_memory_rank, args, name) for name in args.setups}
    summary = summarize(times, memory)
    print(table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "times": times}, f, indent=1)


if __name__ == "__main__":
    main()
