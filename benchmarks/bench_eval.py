"""Benchmark of many-adapter evaluation: adapters evaluated per second, dpeft (in process, 1 and 2 Ray actors) vs a
plain in-process HF PEFT loop, side by side.

    python benchmarks/bench_eval.py [--adapters 24] [--examples 16] [--max-length 32] [--rounds 3] [--json OUT]

Setup (not timed): the packaged all-MiniLM-L6-v2 as a 2-class sequence classifier, Rotten Tomatoes reviews
(`--examples` of them, `--max-length` tokens), and `--adapters` random LoRA adapters (r=8 on query/value, plus the
classifier head, as PEFT saves it), saved in PEFT's format. A local Ray cluster is started once, outside the timing.

Each contender evaluates every adapter (loss + accuracy) from a standing start (imports done, nothing built) and is
timed end to end, wall clock:
- peft_fresh: for each adapter, `AutoModelForSequenceClassification.from_pretrained` of the base folder, then
  `peft.PeftModel.from_pretrained`, then the forwards: what a user's script does;
- peft_cached: the base loaded once, then per adapter `copy.deepcopy(base)` + `PeftModel.from_pretrained` + forwards;
- dpeft_inproc: `dpeft.ray.evaluate_adapters(..., num_actors=0)`: one base, adapters swapped through the store;
- dpeft_ray1 / dpeft_ray2: the same with 1 / 2 Ray actors (actor start and base load included).
In-process contenders run with 1 torch thread, each actor with 1. Rounds run every contender once, in an order that
rotates; rates are medians over rounds, ratios the medians of per-round ratios to peft_fresh. "steady" rates leave
out start-up (imports, Ray actor start, base build): adapters / the busiest worker's summed per-adapter time
(load + forwards + unload; for the PEFT loops, base load/copy + from_pretrained + forwards). The script also checks
that every contender gives the same metrics (max abs difference printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dpeft  # noqa: E402
import dpeft.ray  # noqa: E402
from dpeft.config.run_config import DataSection, ModelSection  # noqa: E402
from dpeft.train.data import collate, load_splits  # noqa: E402
from dpeft.train.loop import loss_sum  # noqa: E402
from dpeft.train.models import HFTokenizer, model_folder  # noqa: E402

BATCH = 16


def setup(workdir: str, n_adapters: int, examples: int, max_length: int) -> tuple[ModelSection, DataSection, list]:
    from dpeft.train.models import build_model

    model = ModelSection(source="all-minilm-l6-v2", task="seq_cls", num_labels=2)
    data = DataSection(source="rotten_tomatoes", max_length=max_length, limit=examples)
    base, _ = build_model(model, max_length, 0)
    paths = []
    for i in range(n_adapters):
        torch.manual_seed(i)
        config = dpeft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS"
        )
        peft_model = dpeft.get_peft_model(base, config)
        path = os.path.join(workdir, f"adapter_{i:03d}")
        peft_model.save_pretrained(path)
        base = peft_model.unload()
        paths.append(path)
    return model, data, paths


def _batches(model: ModelSection, data: DataSection) -> list[dict]:
    from transformers import AutoTokenizer

    tok = HFTokenizer(AutoTokenizer.from_pretrained(model_folder(model.source)))
    splits = load_splits(data, model.task, tok, 0)
    examples = splits.validation + splits.train
    return [collate(examples[i : i + BATCH], tok.pad_id) for i in range(0, len(examples), BATCH)]


@torch.no_grad()
def _metrics(model, batches: list[dict]) -> dict[str, float]:
    loss, correct, rows = 0.0, 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss += float(loss_sum(logits, b["labels"], "seq_cls"))
        correct += float((logits.argmax(-1) == b["labels"]).sum())
        rows += b["labels"].shape[0]
    return {"loss": loss / rows, "accuracy": correct / rows}


def peft_loop(model: ModelSection, data: DataSection, paths: list[str], cached: bool) -> dict[str, dict]:
    import peft
    from transformers import AutoModelForSequenceClassification

    folder = model_folder(model.source)
    batches = _batches(model, data)
    load = lambda: AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)  # noqa: E731
    cached_base = load() if cached else None
    out = {}
    for path in paths:
        tic = time.perf_counter()
        base = copy.deepcopy(cached_base) if cached else load()
        out[path] = _metrics(peft.PeftModel.from_pretrained(base, path).eval(), batches)
        out[path]["seconds"] = time.perf_counter() - tic
    return out


def dpeft_eval(model: ModelSection, data: DataSection, paths: list[str], actors: int) -> dict[str, dict]:
    rows = dpeft.ray.evaluate_adapters(
        model, paths, data, ["loss", "accuracy"], num_actors=actors, batch_size=BATCH, progress=False, threads=1
    )
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad
    return {
        r["adapter"]: {
            "loss": r["loss"],
            "accuracy": r["accuracy"],
            "seconds": r["seconds"],
            "pid": r.get("actor_pid"),
        }
        for r in rows
    }


def busy_seconds(results: dict[str, dict]) -> float:
    """Per-adapter work (load + forwards + unload) of the busiest worker: the run without start-up costs."""
    per_worker: dict = {}
    for r in results.values():
        per_worker[r.get("pid")] = per_worker.get(r.get("pid"), 0.0) + r["seconds"]
    return max(per_worker.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write every per-round sample here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray
    import transformers

    transformers.logging.set_verbosity_error()  # the base folder has no trained head: a load report per load
    transformers.logging.disable_progress_bar()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    contenders = {
        "peft_fresh": lambda m, d, p: peft_loop(m, d, p, cached=False),
        "peft_cached": lambda m, d, p: peft_loop(m, d, p, cached=True),
        "dpeft_inproc": lambda m, d, p: dpeft_eval(m, d, p, 0),
        "dpeft_ray1": lambda m, d, p: dpeft_eval(m, d, p, 1),
        "dpeft_ray2": lambda m, d, p: dpeft_eval(m, d, p, 2),
    }
    names = list(contenders)
    rates: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    steady: dict[str, list[float]] = {n: [] for n in names}
    steady_ratios: dict[str, list[float]] = {n: [] for n in names}
    max_diff = 0.0
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as workdir:
        model, data, paths = setup(workdir, args.adapters, args.examples, args.max_length)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            seconds, results = {}, {}
            for name in order:
                tic = time.perf_counter()
                results[name] = contenders[name](model, data, paths)
                seconds[name] = time.perf_counter() - tic
            busy = {name: busy_seconds(results[name]) for name in names}
            for name in names:
                rates[name].append(len(paths) / seconds[name])
                ratios[name].append(seconds["peft_fresh"] / seconds[name])
                steady[name].append(len(paths) / busy[name])
                steady_ratios[name].append(busy["peft_fresh"] / busy[name])
                for path in paths:
                    for k in ("loss", "accuracy"):
                        v = results[name][path][k]
                        max_diff = max(max_diff, abs(v - results["peft_fresh"][path][k]))
            print(f"round {r + 1}: " + "  ".join(f"{n} {seconds[n]:.2f}s" for n in names), flush=True)
    ray.shutdown()
    print(f"\n{args.adapters} adapters, {args.examples} examples x {args.max_length} tokens, {args.rounds} rounds")
    print(f"{'contender':<14} {'adapters/s':>11} {'x peft_fresh':>13} {'steady/s':>9} {'x peft_fresh':>13}")
    for name in names:
        print(
            f"{name:<14} {statistics.median(rates[name]):>11.2f} {statistics.median(ratios[name]):>12.2f}x"
            f" {statistics.median(steady[name]):>9.2f} {statistics.median(steady_ratios[name]):>12.2f}x"
        )
    print(f"max abs metric difference to peft_fresh: {max_diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "rates": rates,
                    "ratios": ratios,
                    "steady": steady,
                    "steady_ratios": steady_ratios,
                    "max_diff": max_diff,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
