"""Benchmark of `dpeft merge`: throughput at 1 and 2 ranks vs a raw read + write copy, and peak memory per rank.

    python benchmarks/bench_merge.py [--layers 4] [--hidden 1024] [--repeats 3] [--workdir /tmp/bench_merge]

Builds a Llama base of a few hundred MB (float32, saved in 50 MB shards) and a LoRA adapter (r=16, all linear
layers), then measures, each in fresh processes and after a warm-up read so that every run reads from the page
cache:
- raw copy: every base shard read and written in 16 MB chunks, then fsynced (the I/O limit of any merge);
- dpeft merge at 1 and 2 ranks (gloo): wall time of `merge_checkpoint` between two barriers, imports excluded;
- peak RSS of each merge rank above its RSS before the merge, against the largest output shard + adapter + 20%;
- HF PEFT (if installed): `from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`,
  its time and peak RSS above the same baseline.
Prints a table of medians; throughput is MB of base processed per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

SHARD = "50MB"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- setup
def build(workdir: str, layers: int, hidden: int) -> tuple[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dpeft

    base, adapter = os.path.join(workdir, "base-llama"), os.path.join(workdir, "adapter")
    if os.path.isdir(base) and os.path.isdir(adapter):
        return base, adapter
    torch.manual_seed(0)
    heads = hidden // 64
    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(base, max_shard_size=SHARD)
    lora = dpeft.LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path="base-llama",
    )
    dpeft.get_peft_model(model, lora).save_pretrained(adapter)
    return base, adapter


def dir_bytes(path: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(suffix))


def warm(path: str) -> None:
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            while f.read(16 << 20):
                pass


# ---------------------------------------------------------------------------------------------- measurements
def raw_copy(base: str, out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    start = time.perf_counter()
    for name in sorted(os.listdir(base)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(base, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    return time.perf_counter() - start


def worker(base: str, adapter: str, out: str) -> None:
    """One merge rank (RANK/WORLD_SIZE/MASTER_* set by the parent); prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    from dpeft.checkpoint import merge_checkpoint
    from dpeft.dist import barrier, destroy_distributed, init_distributed

    init_distributed("cpu")
    # The fixed start-up (importing transformers and the model class the skeleton needs) is reported apart: it
    # is neither throughput nor memory that grows with the model.
    start = time.perf_counter()
    import transformers

    getattr(transformers, transformers.AutoConfig.from_pretrained(base).architectures[0])
    startup = time.perf_counter() - start
    before = rss_mb()
    barrier()
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    report = merge_checkpoint(base, [adapter], out, shard_size=SHARD, progress=False)
    barrier()
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    print(
        json.dumps(
            {
                "rank": int(os.environ["RANK"]),
                "seconds": seconds,
                "rss_before_mb": before,
                "peak_mb": peak_rss_mb(),
                "rank_bytes": report.rank_bytes,
                "startup": startup,
                "cpu": cpu,
            }
        ),
        flush=True,
    )
    destroy_distributed()


def run_merge(base: str, adapter: str, out: str, world: int, port: int) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", base, adapter, out], env=env, stdout=subprocess.PIPE, text=True
            )
        )
    rows = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"merge worker failed with exit code {p.returncode}")
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
    return rows


def peft_worker(base: str, adapter: str, out: str) -> None:
    """HF PEFT's in-memory route on the same files; prints one JSON line."""
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    getattr(transformers, transformers.AutoConfig.from_pretrained(base).architectures[0])  # as for dpeft
    before = rss_mb()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size=SHARD)
    print(json.dumps({"seconds": time.perf_counter() - start, "rss_before_mb": before, "peak_mb": peak_rss_mb()}))


def run_peft(base: str, adapter: str, out: str) -> dict | None:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, __file__, "--peft-worker", base, adapter, out], env=env, capture_output=True, text=True
    )
    if p.returncode:
        print(f"HF PEFT run failed (is peft installed?):\n{p.stderr[-2000:]}")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def largest_shard_mb(out: str) -> float:
    return max(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/bench_merge")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--peft-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.peft_worker:
        return peft_worker(*args.peft_worker)

    os.makedirs(args.workdir, exist_ok=True)
    base, adapter = build(args.workdir, args.layers, args.hidden)
    mb = dir_bytes(base) / 1e6
    adapter_mb = dir_bytes(adapter) / 1e6
    out = os.path.join(args.workdir, "out")
    warm(base)
    times: dict[str, list[float]] = {"raw copy": [], "merge, 1 rank": [], "merge, 2 ranks": []}
    peaks: dict[int, list[dict]] = {1: [], 2: []}
    for i in range(args.repeats):
        times["raw copy"].append(raw_copy(base, out))
        for world in (1, 2):
            rows = run_merge(base, adapter, out, world, 29650 + 2 * i + world)
            times[f"merge, {world} rank{'s' if world > 1 else ''}"].append(max(r["seconds"] for r in rows))
            peaks[world].extend(rows)
    shard_mb = largest_shard_mb(out)
    print(
        f"base: {mb:.0f} MB in {len([n for n in os.listdir(base) if n.endswith('.safetensors')])} files; "
        f"adapter: {adapter_mb:.1f} MB; machine: {os.cpu_count()} CPUs (shared); medians of {args.repeats} runs"
    )
    print(f"{'':<18} {'seconds':>8} {'MB/s':>8} {'vs raw copy':>12}")
    raw = statistics.median(times["raw copy"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<18} {t:8.2f} {mb / t:8.1f} {raw / t:11.2f}x")
    bound = 1.2 * (shard_mb + adapter_mb)
    print(
        f"\npeak RSS above the pre-merge RSS, per rank (bound: 1.2 x (largest output shard {shard_mb:.0f} MB + "
        f"adapter {adapter_mb:.1f} MB) = {bound:.0f} MB)"
    )
    for world, rows in peaks.items():
        cpu = statistics.median(max(r["cpu"] for r in rows[i : i + world]) for i in range(0, len(rows), world))
        print(f"CPU seconds (user + sys) of the busiest rank, {world} rank(s): {cpu:.2f}")
    startup = statistics.median(r["startup"] for rows in peaks.values() for r in rows)
    print(f"(not in the merge times: {startup:.1f} s per rank to import transformers and the model class)")
    for world, rows in peaks.items():
        extra = statistics.median(r["peak_mb"] - r["rss_before_mb"] for r in rows)
        before = statistics.median(r["rss_before_mb"] for r in rows)
        print(
            f"dpeft merge, {world} rank(s): +{extra:.0f} MB (process RSS before the merge {before:.0f} MB, "
            f"peak {statistics.median(r['peak_mb'] for r in rows):.0f} MB)"
        )
    ref = run_peft(base, adapter, os.path.join(args.workdir, "out_peft"))
    if ref:
        print(
            f"HF PEFT load + merge_and_unload + save: +{ref['peak_mb'] - ref['rss_before_mb']:.0f} MB "
            f"(peak {ref['peak_mb']:.0f} MB), {ref['seconds']:.2f} s = {mb / ref['seconds']:.1f} MB/s (one run)"
        )


if __name__ == "__main__":
    main()
