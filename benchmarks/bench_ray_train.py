"""What Ray Train costs over torchrun for the same dpeft run, side by side in one run.

    python benchmarks/bench_ray_train.py                 # 3 interleaved repeats; prints a table, writes --json

The same run config (configs/tiny_llama.yaml: LoRA r=8 on a 2-layer tiny Llama, sharded store, global batch 8,
one torch thread per rank, a checkpoint every 10 steps) on 2 ranks, launched two ways, alternately (ABAB...):
``torchrun --standalone --nproc_per_node=2 -m dpeft.cli.main train`` (what launch/torchrun.sh runs) and
`dpeft.ray.train(num_workers=2)` on a local Ray cluster started once by this script (its start is timed apart).
Figures per launcher are medians over the repeats of: the end-to-end wall time of the launch, and the training
loop's own wall time (`wall_time` of the closing metrics.jsonl record: steps, evaluations, checkpoints and, under
Ray, the per-step ``ray.train.report`` calls and checkpoint uploads). Both launchers run the identical loop and
must give the identical final loss; the script checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")


def _overrides(out_dir: str, steps: int) -> list[str]:
    return [
        "train.threads=1",
        "train.progress_bar=false",
        f"train.steps={steps}",
        "store.backend=sharded",
        "checkpoint.every=10",
        f"output.dir={out_dir}",
    ]


def _end_record(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return {"loop_s": records[-1]["wall_time"], "last_loss": [r for r in records if "lr" in r][-1]["loss"]}


def run_torchrun(out_dir: str, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "dpeft.cli.main", "train", "--config", TINY, *_overrides(out_dir, steps)]
    tic = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return {"total_s": time.perf_counter() - tic, **_end_record(out_dir)}


def run_ray(out_dir: str, steps: int) -> dict:
    import dpeft.ray

    tic = time.perf_counter()
    dpeft.ray.train(TINY, _overrides(out_dir, steps), num_workers=2)
    return {"total_s": time.perf_counter() - tic, **_end_record(out_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results_ray_train.json"))
    args = parser.parse_args()
    import ray

    tic = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster_s = time.perf_counter() - tic
    runs: dict[str, list[dict]] = {"torchrun": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="bench-ray-train-") as scratch:
        for i in range(args.repeats):
            for name, fn in (("torchrun", run_torchrun), ("ray", run_ray)):
                runs[name].append(fn(os.path.join(scratch, f"{name}-{i}"), args.steps))
                print(f"repeat {i} {name}: {runs[name][-1]}", flush=True)
    ray.shutdown()
    losses = {r["last_loss"] for rs in runs.values() for r in rs}
    assert len(losses) == 1, f"launchers disagree on the final loss: {losses}"
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("total_s", "loop_s")} for n, rs in runs.items()}
    out = {"steps": args.steps, "repeats": args.repeats, "ray_cluster_start_s": cluster_s, "median": med, "runs": runs}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print("| launcher | end-to-end (median) | training loop (median) |\n|---|---|---|")
    for name in runs:
        print(f"| {name} | {med[name]['total_s']:.1f} s | {med[name]['loop_s']:.2f} s |")
    ratio = {k: med["ray"][k] / med["torchrun"][k] for k in ("total_s", "loop_s")}
    print(f"ray / torchrun: end-to-end {ratio['total_s']:.2f}x, loop {ratio['loop_s']:.2f}x")
    print(f"local Ray cluster start (once, not in the figures): {cluster_s:.1f} s")


if __name__ == "__main__":
    main()
