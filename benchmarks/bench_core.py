"""Foundation benchmark: dpeft against HF PEFT, side by side in one process, on a tiny Llama (CPU, float32).

Measures, each with PEFT's figure beside dpeft's:
  1. LoRA r=16 all-linear train step (forward + backward + AdamW over adapter params), and both against a
     frozen forward + backward of the base model.
  2. DoRA step / LoRA step, for each library.
  3. `from_pretrained` of a saved r=64 all-linear adapter onto an already built base, against a raw safetensors
     `load_file` + copy into the same tensors.
  4. `save_pretrained` against a raw safetensors `save_file` of the same tensors.

Every figure is the median over interleaved repeats (each repeat runs every contender once, in a rotating order),
so all contenders see the same background load on a shared machine.

Run:
    python benchmarks/bench_core.py                       # full run, prints the table
    python benchmarks/bench_core.py --json bench.json     # also writes the figures as JSON
    python benchmarks/bench_core.py --quick               # smaller repeats, for a smoke check
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import dpeft
from dpeft.store.safetensors_io import save_safetensors

try:
    import peft
except ImportError:  # the comparison needs HF PEFT; dpeft itself never imports it
    sys.exit("bench_core.py compares against HF PEFT: pip install peft==0.21.2")

BATCH, SEQ = 4, 256
# The clock every figure is taken with: process CPU time by default (one thread), which a shared machine's other
# jobs disturb far less than wall time; `--clock wall` for a quiet machine or more than one thread.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def llama_config() -> LlamaConfig:
    """The benchmark model: hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 1024."""
    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )


def build_base(seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised base model; the same seed gives the same weights on both sides."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).float()


def lora_config(lib, r: int, use_dora: bool = False, init_lora_weights: bool = True):
    """The same LoRA config in `lib` (dpeft or peft)."""
    return lib.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules="all-linear",
        lora_dropout=0.0,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        task_type="CAUSAL_LM",
    )


def interleaved(fns: dict[str, Callable[[], float | None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function `repeats` times, one call of every function per round in a rotating order.

    A function may return its own measured duration (for calls whose setup must stay outside the timing);
    otherwise its wall time is used.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            gc.collect()
            start = clock()
            own = fns[name]()
            times[name].append(own if own is not None else clock() - start)
    return times


# ---------------------------------------------------------------------------------------------- training step
def _train_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


def _frozen_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of the frozen base: activation gradients through every layer, no weight gradients."""
    model.requires_grad_(False)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def step() -> None:
        embeds.grad = None
        model(inputs_embeds=embeds, labels=ids).loss.backward()

    return step


def bench_train(repeats: int, r: int = 16) -> dict[str, list[float]]:
    """Seconds per train step for the frozen base and LoRA / DoRA in each library."""
    torch.manual_seed(1)
    ids = torch.randint(0, llama_config().vocab_size, (BATCH, SEQ))
    steps = {"base": _frozen_step(build_base(), ids)}
    for method, dora in (("lora", False), ("dora", True)):
        steps[f"dpeft_{method}"] = _train_step(dpeft.get_peft_model(build_base(), lora_config(dpeft, r, dora)), ids)
        steps[f"peft_{method}"] = _train_step(peft.get_peft_model(build_base(), lora_config(peft, r, dora)), ids)
    return interleaved(steps, repeats)


# ---------------------------------------------------------------------------------------------- loading
def _saved_adapter(directory: str, r: int) -> None:
    """Save a random (B != 0) r=`r` all-linear adapter with HF PEFT, so both libraries read PEFT's own file."""
    torch.manual_seed(2)
    model = peft.get_peft_model(build_base(), lora_config(peft, r, init_lora_weights=False))
    model.save_pretrained(directory)


def _timed_load(lib, template: torch.nn.Module, directory: str) -> Callable[[], float]:
    def run() -> float:
        base = copy.deepcopy(template)  # a fresh base per call, built outside the timed region
        gc.collect()
        start = clock()
        lib.PeftModel.from_pretrained(base, directory)
        return clock() - start

    return run


def bench_load(repeats: int, directory: str) -> dict[str, list[float]]:
    """Seconds of `from_pretrained` in each library and of a raw safetensors read + copy."""
    template = build_base()
    path = os.path.join(directory, "adapter_model.safetensors")
    loaded = dpeft.PeftModel.from_pretrained(copy.deepcopy(template), directory)
    targets = dpeft.get_peft_model_state_dict(loaded)  # the adapter tensors themselves (detached views)

    def raw() -> None:
        with torch.no_grad():
            for key, tensor in load_file(path).items():
                targets[key].copy_(tensor)

    fns = {
        "raw": raw,
        "dpeft": _timed_load(dpeft, template, directory),
        "peft": _timed_load(peft, template, directory),
    }
    return interleaved(fns, repeats)


# ---------------------------------------------------------------------------------------------- saving
def bench_save(repeats: int, source: str, out: str) -> dict[str, list[float]]:
    """Seconds of `save_pretrained` in each library and of a raw safetensors `save_file`.

    Like for like: every contender replaces its previous file in the same directory each round (safetensors >= 0.7
    `save_file` itself writes a temporary file and renames it, as dpeft does), and dpeft's file must hold exactly
    the raw file's bytes (checked below), so neither side writes less.
    """
    ours = dpeft.PeftModel.from_pretrained(build_base(), source)
    theirs = peft.PeftModel.from_pretrained(build_base(), source)
    tensors = {k: v.contiguous() for k, v in dpeft.get_peft_model_state_dict(ours).items()}
    os.makedirs(out, exist_ok=True)
    raw_path = os.path.join(out, "raw.safetensors")
    own_path = os.path.join(out, "raw_dpeft_writer.safetensors")
    fns = {
        "raw": lambda: save_file(tensors, raw_path, metadata={"format": "pt"}),
        # The same bytes through dpeft's own writer: what save_pretrained pays beyond writing the file.
        "raw_dpeft_writer": lambda: save_safetensors(tensors, own_path, metadata={"format": "pt"}),
        "dpeft": lambda: ours.save_pretrained(os.path.join(out, "dpeft")),
        "peft": lambda: theirs.save_pretrained(os.path.join(out, "peft")),
    }
    times = interleaved(fns, repeats)
    with open(raw_path, "rb") as raw, open(os.path.join(out, "dpeft", "adapter_model.safetensors"), "rb") as saved:
        if raw.read() != saved.read():
            raise RuntimeError("dpeft's adapter file differs from save_file's: the comparison is not like for like")
    return times


# ---------------------------------------------------------------------------------------------- report
TARGETS = {
    "lora_step_dpeft_over_peft": 1.0,
    "dora_over_lora_dpeft": 1.05,
    "load_over_raw_dpeft": 2.0,
    "save_over_raw_dpeft": 1.1,
}


# name -> (part, numerator, denominator)
RATIOS = {
    "lora_step_dpeft_over_peft": ("train", "dpeft_lora", "peft_lora"),
    "lora_step_over_base_dpeft": ("train", "dpeft_lora", "base"),
    "lora_step_over_base_peft": ("train", "peft_lora", "base"),
    "dora_step_dpeft_over_peft": ("train", "dpeft_dora", "peft_dora"),
    "dora_over_lora_dpeft": ("train", "dpeft_dora", "dpeft_lora"),
    "dora_over_lora_peft": ("train", "peft_dora", "peft_lora"),
    "load_over_raw_dpeft": ("load", "dpeft", "raw"),
    "load_over_raw_peft": ("load", "peft", "raw"),
    "save_over_raw_dpeft": ("save", "dpeft", "raw"),
    "save_over_raw_peft": ("save", "peft", "raw"),
    "save_over_dpeft_writer_dpeft": ("save", "dpeft", "raw_dpeft_writer"),
    "dpeft_writer_over_raw": ("save", "raw_dpeft_writer", "raw"),
}


def ratios(samples: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Each target ratio as the median of per-round ratios: both sides of a pair ran in the same round, under the
    same background load, so pairing removes most of the drift that separate medians keep."""
    return {
        name: statistics.median(a / b for a, b in zip(samples[part][num], samples[part][den]))
        for name, (part, num, den) in RATIOS.items()
        if samples[part]  # `--only` leaves the other half out
    }


def table(train: dict[str, float], load: dict[str, float], save: dict[str, float], rat: dict[str, float]) -> str:
    """A plain-text table: one row per measurement, dpeft beside PEFT, with the target where there is one."""
    ms = lambda s: f"{1000 * s:9.1f} ms"

    def row(label: str, ours: str, theirs: str, target: str = "") -> str:
        return f"{label:<40} {ours:>14} {theirs:>14} {target:>10}"

    lines = [row("measurement", "dpeft", "HF PEFT", "target"), "-" * 81]
    lines.append(row("frozen base fwd+bwd", ms(train["base"]), ms(train["base"])))
    lines.append(row("LoRA r=16 train step", ms(train["dpeft_lora"]), ms(train["peft_lora"])))
    lines.append(row("  LoRA step, dpeft / PEFT", f"{rat['lora_step_dpeft_over_peft']:.3f}x", "", "<= 1.0"))
    lines.append(
        row(
            "  LoRA step / frozen base",
            f"{rat['lora_step_over_base_dpeft']:.3f}x",
            f"{rat['lora_step_over_base_peft']:.3f}x",
            "~1.05",
        )
    )
    lines.append(row("DoRA r=16 train step", ms(train["dpeft_dora"]), ms(train["peft_dora"])))
    lines.append(
        row(
            "  DoRA step / LoRA step",
            f"{rat['dora_over_lora_dpeft']:.3f}x",
            f"{rat['dora_over_lora_peft']:.3f}x",
            "<= 1.05",
        )
    )
    lines.append(row("raw load_file + copy (r=64)", ms(load["raw"]), ms(load["raw"])))
    lines.append(row("from_pretrained (r=64)", ms(load["dpeft"]), ms(load["peft"])))
    lines.append(
        row(
            "  from_pretrained / raw",
            f"{rat['load_over_raw_dpeft']:.2f}x",
            f"{rat['load_over_raw_peft']:.2f}x",
            "<= 2",
        )
    )
    lines.append(row("raw save_file (r=64)", ms(save["raw"]), ms(save["raw"])))
    lines.append(row("save_pretrained (r=64)", ms(save["dpeft"]), ms(save["peft"])))
    lines.append(
        row(
            "  save_pretrained / raw",
            f"{rat['save_over_raw_dpeft']:.2f}x",
            f"{rat['save_over_raw_peft']:.2f}x",
            "<= 1.1",
        )
    )
    lines.append(row("  same bytes, dpeft's writer / raw", f"{rat['dpeft_writer_over_raw']:.2f}x", ""))
    lines.append(row("  save_pretrained / dpeft's writer", f"{rat['save_over_dpeft_writer_dpeft']:.2f}x", ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of each train step (median)")
    parser.add_argument("--io-repeats", type=int, default=15, help="interleaved repeats of each load/save (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 on a shared machine)")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), help="cpu (default with 1 thread) or wall (default otherwise)"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--only", choices=["train", "io"], help="run only one half")
    parser.add_argument("--quick", action="store_true", help="3 repeats each: a smoke check, not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = args.io_repeats = 3
    torch.set_num_threads(args.threads)
    global clock
    args.clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    if args.clock == "cpu" and args.threads > 1:
        parser.error("--clock cpu counts every thread's time, spinning included; use it with --threads 1")
    clock = CLOCKS[args.clock]
    warnings.filterwarnings("ignore")
    samples = {"train": {}, "load": {}, "save": {}}
    if args.only != "io":
        samples["train"] = bench_train(args.repeats)
    if args.only != "train":
        with tempfile.TemporaryDirectory() as tmp:
            source, out = os.path.join(tmp, "adapter"), os.path.join(tmp, "out")
            _saved_adapter(source, r=64)
            samples["load"] = bench_load(args.io_repeats, source)
            samples["save"] = bench_save(args.io_repeats, source, out)
    medians = {part: {k: statistics.median(v) for k, v in got.items()} for part, got in samples.items()}
    train, load, save = medians["train"], medians["load"], medians["save"]
    result = {
        "machine": {
            "threads": args.threads,
            "clock": args.clock,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "peft": peft.__version__,
        },
        "repeats": {"train": args.repeats, "io": args.io_repeats},
        "seconds": medians,
        "samples": samples,
    }
    if train and load:
        result["ratios"] = ratios(samples)
        result["targets"] = TARGETS
        print(table(train, load, save, result["ratios"]))
    else:
        result["ratios"] = ratios(samples)
        print(json.dumps({"seconds": result["seconds"], "ratios": result["ratios"]}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
