"""Many-adapter evaluation: in process (`dpeft.eval`), on a pool of Ray actors (`dpeft.ray.evaluate_adapters`) and
through `dpeft eval`.

Every adapter's metrics are checked against an independent reference: a fresh base, `PeftModel.from_pretrained`
and the training loop's `evaluate` (and, for a few adapters, HF PEFT loading the same folder).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os

import pytest
import torch

import dpeft
import dpeft.ray
from dpeft.config.run_config import DataSection, ModelSection
from dpeft.eval import evaluate_in_process
from dpeft.train.data import collate, load_splits
from dpeft.train.loop import evaluate
from dpeft.train.models import build_model

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MAX_LEN, BATCH, ATOL = 32, 8, 1e-5
N_LORA = 32


def _write_data(path: str, n: int = 24) -> str:
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + k) % len(words)] for k in range(3 + i % 5))
            f.write(json.dumps({"text": text, "label": i % 3}) + "\n")
    return path


_BASES: dict = {}


def _base(task: str = "causal_lm", tiny: dict | None = None):
    """(base model, tokenizer), built once per shape: adapters are added to it and unloaded again."""
    section = ModelSection(tiny=tiny or dict(TINY), task=task, num_labels=3)
    key = (task, tuple(sorted(section.tiny.items())))
    if key not in _BASES:
        _BASES[key] = build_model(section, MAX_LEN, 0)
    return _BASES[key]


def _save(config, out: str, seed: int, task: str = "causal_lm", tiny: dict | None = None) -> str:
    torch.manual_seed(seed)
    model = dpeft.get_peft_model(_base(task, tiny)[0], config)
    model.save_pretrained(out)
    model.unload()
    return out


def _lora(seed: int, r: int = 4, targets="all-linear", task: str = "CAUSAL_LM"):
    return dpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, task_type=task)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """32 LoRA adapters, two each of IA3 and LoHa, a distributed checkpoint root holding a LoRA and an IA3 adapter,
    a corrupt and an incompatible one."""
    root = tmp_path_factory.mktemp("eval")
    data = _write_data(str(root / "data.jsonl"))
    paths = {}
    for i in range(N_LORA):
        targets = ["q_proj", "v_proj"] if i % 2 else "all-linear"
        paths[f"lora_{i:02d}"] = _save(_lora(i, r=2 + i % 3, targets=targets), str(root / f"lora_{i:02d}"), i)
    for i in range(2):
        ia3 = dpeft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)
        paths[f"ia3_{i}"] = _save(ia3, str(root / f"ia3_{i}"), 100 + i)
        loha = dpeft.LoHaConfig(r=2, target_modules=["q_proj", "o_proj"], init_weights=False, task_type="CAUSAL_LM")
        paths[f"loha_{i}"] = _save(loha, str(root / f"loha_{i}"), 200 + i)
    paths["dcp"] = _save_checkpoint(str(root / "ckpt"))  # two adapters: rows dcp[default] and dcp[other]
    exported = str(root / "ckpt-exported")
    from dpeft.checkpoint import export_checkpoint

    export_checkpoint(paths["dcp"], exported)
    corrupt = _save(_lora(300), str(root / "corrupt"), 300)
    weights = os.path.join(corrupt, "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    paths["corrupt"] = corrupt
    wide = dict(TINY, hidden_size=48)  # saved on a wider model: shapes do not fit the base
    paths["incompatible"] = _save(_lora(301), str(root / "incompatible"), 301, tiny=wide)
    # Row name -> the PEFT-format folder its reference loads.
    folders = {k: v for k, v in paths.items() if k != "dcp"}
    folders.update({"dcp[default]": exported, "dcp[other]": os.path.join(exported, "other")})
    return {"root": root, "data": data, "paths": paths, "folders": folders}


def _save_checkpoint(root: str) -> str:
    from dpeft.checkpoint import save_checkpoint

    torch.manual_seed(400)
    model = dpeft.get_peft_model(_base()[0], _lora(400))
    model.add_adapter("other", dpeft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    optimizer = torch.optim.AdamW(model.store.optimizer_parameters(), lr=1e-3)
    save_checkpoint(root, 3, model, optimizer, {"step": 3, "data_position": 0})
    model.unload()
    return root  # a checkpoint root: its newest complete step is evaluated


def _reference(path: str, data: str, task: str = "causal_lm", metrics=("loss", "perplexity")) -> dict[str, float]:
    """A fresh base, PeftModel.from_pretrained and the training loop's evaluation: no code of dpeft.eval."""
    base, tok = _base(task)
    model = dpeft.PeftModel.from_pretrained(base, path)
    splits = load_splits(DataSection(source=data, max_length=MAX_LEN), task, tok, 0)
    try:
        return _loop_eval(model, splits, task, metrics, tok.pad_id)
    finally:
        model.unload()


def _loop_eval(model, splits, task, metrics, pad_id) -> dict[str, float]:
    """The training loop's validation code, in one process."""
    return evaluate(
        model,
        splits.validation + splits.train,
        task,
        list(metrics),
        batch_size=BATCH,
        pad_id=pad_id,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        rank=0,
        world=1,
        all_reduce_mean=None,
    )


@pytest.fixture(scope="module")
def references(suite):
    return {
        name: _reference(path, suite["data"])
        for name, path in suite["folders"].items()
        if name not in ("corrupt", "incompatible")
    }


def _check_rows(rows, suite, references):
    by_name = {r["adapter"]: r for r in rows}
    assert sorted(by_name) == sorted(suite["folders"])
    assert by_name["dcp[other]"]["method"] == "IA3" and by_name["dcp[default]"]["method"] == "LORA"
    for name, ref in references.items():
        row = by_name[name]
        assert row["status"] == "ok", (name, row["error"])
        for metric, value in ref.items():
            assert abs(row[metric] - value) <= ATOL * max(1.0, abs(value)), (name, metric, row[metric], value)
    assert by_name["corrupt"]["status"] == "error" and "corrupt" in by_name["corrupt"]["error"]
    assert by_name["incompatible"]["status"] == "error" and "shape" in by_name["incompatible"]["error"].lower()
    assert by_name["ia3_0"]["method"] == "IA3" and by_name["loha_1"]["method"] == "LOHA"
    ok = [r["loss"] for r in rows if r["status"] == "ok"]
    assert ok == sorted(ok) and [r["status"] for r in rows[len(ok) :]] == ["error", "error"]
    # Adapters really differ from each other (random non-zero inits), so the comparison above can fail.
    assert len({round(v, 6) for v in ok}) == len(ok)


def test_in_process_matches_reference_and_reports_bad_adapters(suite, references, tmp_path):
    out = tmp_path / "results.json"
    rows = evaluate_in_process(
        {"tiny": TINY},
        suite["paths"],
        {"source": suite["data"], "max_length": MAX_LEN},
        ["loss", "perplexity"],
        batch_size=BATCH,
        output=out,
        progress=False,
    )
    _check_rows(rows, suite, references)
    written = json.loads(out.read_text())
    assert [r["adapter"] for r in written] == [r["adapter"] for r in rows]


def test_ray_pool_of_two_matches_in_process_and_survives_a_dead_actor(suite, references, ray_cluster, tmp_path):
    """38 adapters of three methods (two from a distributed checkpoint), a corrupt and an incompatible one, on 2
    actors; the actor that gets `lora_20` exits abruptly (once): its adapters are retried on the other actor and
    every row is present."""
    from dpeft.ray.evaluate import CRASH_ONCE_ENV

    out, marker = tmp_path / "results.csv", tmp_path / "crashed"
    rows = dpeft.ray.evaluate_adapters(
        {"tiny": TINY},
        suite["paths"],
        {"source": suite["data"], "max_length": MAX_LEN},
        ["loss", "perplexity"],
        num_actors=2,
        address=ray_cluster,
        batch_size=BATCH,
        output=out,
        progress=False,
        runtime_env={"env_vars": {CRASH_ONCE_ENV: f"lora_20::{marker}"}},
    )
    assert marker.exists(), "the test hook did not kill an actor"
    _check_rows(rows, suite, references)
    by_name = {r["adapter"]: r for r in rows}
    assert by_name["lora_20"]["attempts"] == 2 and by_name["lora_20"]["status"] == "ok"
    assert by_name["lora_00"]["attempts"] == 1
    pids = {r["actor_pid"] for r in rows if "actor_pid" in r}
    assert len(pids) == 2, "both actors should have evaluated adapters"
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["adapter"] for r in table] == [r["adapter"] for r in rows]
    assert float(table[0]["loss"]) == pytest.approx(rows[0]["loss"], abs=1e-12)


def test_loss_matches_hf_peft(suite):
    """HF PEFT loads the same folders onto the same base: same loss as dpeft's evaluator."""
    peft = pytest.importorskip("peft")
    names = ["lora_00", "lora_01", "ia3_0", "loha_0"]
    rows = evaluate_in_process(
        {"tiny": TINY},
        {n: suite["paths"][n] for n in names},
        {"source": suite["data"], "max_length": MAX_LEN},
        "loss",
        batch_size=BATCH,
        progress=False,
    )
    base, tok = _base()
    splits = load_splits(DataSection(source=suite["data"], max_length=MAX_LEN), "causal_lm", tok, 0)
    for row in rows:
        model = peft.PeftModel.from_pretrained(base, suite["paths"][row["adapter"]]).eval()
        expected = _loop_eval(model, splits, "causal_lm", ["loss"], tok.pad_id)["loss"]
        model.unload()
        assert row["loss"] == pytest.approx(expected, abs=ATOL), row["adapter"]


def test_classification_accuracy_and_user_metric(tmp_path):
    data = _write_data(str(tmp_path / "cls.jsonl"), n=30)
    paths = {
        f"cls_{i}": _save(_lora(i, task="SEQ_CLS"), str(tmp_path / f"cls_{i}"), i, task="seq_cls") for i in range(3)
    }

    def pos_rate(model, batch):  # share of rows predicted as class 0, a user metric
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"class0_rate": float((logits.argmax(-1) == 0).float().mean())}

    rows = evaluate_in_process(
        {"tiny": TINY, "task": "seq_cls", "num_labels": 3},
        paths,
        {"source": data, "max_length": MAX_LEN},
        ["accuracy", "loss", pos_rate],
        batch_size=BATCH,
        progress=False,
    )
    accuracies = [r["accuracy"] for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)  # accuracy sorts best (highest) first
    for row in rows:
        ref = _reference(paths[row["adapter"]], data, "seq_cls", ("accuracy", "loss"))
        assert row["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
        assert row["loss"] == pytest.approx(ref["loss"], abs=ATOL)
        # Hand reference of the user metric: all 30 rows at once (batch-size-weighted means equal the full mean).
        base, tok = _base("seq_cls")
        model = dpeft.PeftModel.from_pretrained(base, paths[row["adapter"]]).eval()
        splits = load_splits(DataSection(source=data, max_length=MAX_LEN), "seq_cls", tok, 0)
        with torch.no_grad():
            expected = pos_rate(model, collate(splits.validation + splits.train, tok.pad_id))["class0_rate"]
        model.unload()
        assert row["class0_rate"] == pytest.approx(expected, abs=1e-7)


def test_failing_metric_function_is_that_adapters_error_and_leaves_the_base_clean(suite, references):
    calls = []

    def flaky(model, batch):  # fails on its very first call, i.e. on the first adapter
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("metric exploded")
        return {"rows": float(batch["input_ids"].shape[0])}

    names = ["lora_02", "lora_03", "ia3_1"]
    rows = evaluate_in_process(
        {"tiny": TINY},
        {n: suite["paths"][n] for n in names},
        {"source": suite["data"], "max_length": MAX_LEN},
        ["loss", flaky],
        batch_size=10,
        progress=False,
    )
    by_name = {r["adapter"]: r for r in rows}
    assert by_name["lora_02"]["status"] == "error" and "metric exploded" in by_name["lora_02"]["error"]
    for name in names[1:]:  # evaluated after the failure: the failed adapter was removed from the base
        assert by_name[name]["loss"] == pytest.approx(references[name]["loss"], abs=ATOL)
        # Batches of 10, 10 and 4 rows: the row-weighted mean is (10*10 + 10*10 + 4*4) / 24 = 9 (unweighted: 8).
        assert by_name[name]["rows"] == pytest.approx(9.0)


def test_cli_in_process(suite, tmp_path, capsys):
    from dpeft.cli.main import main

    out = tmp_path / "cli.csv"
    adapters = [suite["paths"]["lora_03"], suite["paths"]["corrupt"]]
    main(
        [
            "eval",
            "--base",
            "tiny-llama",
            "--adapters",
            *adapters,
            "--adapters-glob",
            str(suite["root"] / "ia3_*"),
            "--data",
            suite["data"],
            "--metric",
            "loss,perplexity",
            "--actors",
            "0",
            "--batch-size",
            str(BATCH),
            "--out",
            str(out),
            "--no-progress",
            *(f"model.tiny.{k}={v}" for k, v in TINY.items()),
            f"data.max_length={MAX_LEN}",
        ]
    )
    with open(out, newline="") as f:
        table = {r["adapter"]: r for r in csv.DictReader(f)}
    assert sorted(table) == sorted([*adapters, suite["paths"]["ia3_0"], suite["paths"]["ia3_1"]])
    ref = _reference(suite["paths"]["lora_03"], suite["data"])
    assert float(table[suite["paths"]["lora_03"]]["loss"]) == pytest.approx(ref["loss"], abs=ATOL)
    assert float(table[suite["paths"]["lora_03"]]["perplexity"]) == pytest.approx(math.exp(ref["loss"]), rel=1e-5)
    assert table[suite["paths"]["corrupt"]]["status"] == "error"
    assert "1 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metrics": "bleu"}, "metrics"),
        ({"metrics": "accuracy"}, "seq_cls"),
        ({"adapters": []}, "no adapters"),
        ({"output": "results.txt"}, ".csv"),
        ({"sort_by": "accuracy"}, "sort_by"),
        ({"split": "test"}, "split"),
        ({"dataset": "missing.jsonl"}, "data.source"),
        ({"base": "no/such/model"}, "model.source"),
        ({"num_actors": -1}, "num_actors"),
        ({"base": {"tiny": TINY, "bogus": 1}}, "bogus"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_requests_fail_before_any_work(suite, kwargs, message):
    args = {
        "base": {"tiny": TINY},
        "adapters": [suite["paths"]["lora_00"]],
        "dataset": suite["data"],
        "metrics": "loss",
        "num_actors": 2,
        "progress": False,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dpeft.ray.evaluate_adapters(args.pop("base"), args.pop("adapters"), args.pop("dataset"), **args)


def test_duplicate_names_and_empty_glob_are_errors(suite):
    from dpeft.eval import expand_adapters

    path = suite["paths"]["lora_00"]
    with pytest.raises(ValueError, match="more than once"):
        expand_adapters([path, path])
    with pytest.raises(ValueError, match="matches no directory"):
        expand_adapters([], [str(suite["root"] / "nothing_*")])


@pytest.mark.slow
def test_cli_on_a_local_ray_cluster_started_on_demand(suite, tmp_path):
    """`dpeft eval --actors 1` in a fresh process: no Ray running, so the call starts (and stops) its own cluster."""
    import subprocess
    import sys

    out = tmp_path / "ray.jsonl"
    names = ["lora_07", "loha_1", "corrupt"]
    cmd = [sys.executable, "-m", "dpeft.cli.main", "eval", "--base", "tiny-llama", "--data", suite["data"],
           "--adapters", *(suite["paths"][n] for n in names), "--actors", "1", "--metric", "perplexity,loss",
           "--batch-size", str(BATCH), "--out", str(out), "--no-progress",
           *(f"model.tiny.{k}={v}" for k, v in TINY.items()), f"data.max_length={MAX_LEN}"]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["adapter"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == sorted(suite["paths"][n] for n in names)
    for name in ("lora_07", "loha_1"):
        ref = _reference(suite["paths"][name], suite["data"])
        assert rows[suite["paths"][name]]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert rows[suite["paths"]["corrupt"]]["status"] == "error"


@pytest.mark.slow
def test_ray_adapter_that_kills_every_actor_is_reported_and_pool_exhaustion_too(suite, ray_cluster):
    """An adapter that kills each actor it reaches: after max_retries it is an error row; once both actors are
    dead, the adapters not yet evaluated are error rows too (the call returns a full table, it does not hang)."""
    from dpeft.ray.evaluate import CRASH_ONCE_ENV

    names = ["lora_00", "lora_01", "lora_02", "lora_03", "lora_04", "lora_05"]
    rows = dpeft.ray.evaluate_adapters(
        {"tiny": TINY},
        {n: suite["paths"][n] for n in names},
        {"source": suite["data"], "max_length": MAX_LEN},
        "loss",
        num_actors=2,
        address=ray_cluster,
        batch_size=BATCH,
        progress=False,
        max_retries=1,
        runtime_env={"env_vars": {CRASH_ONCE_ENV: "lora_02::"}},
    )
    by_name = {r["adapter"]: r for r in rows}
    assert sorted(by_name) == sorted(names)
    assert by_name["lora_02"]["status"] == "error" and "died 2 times" in by_name["lora_02"]["error"]
    assert by_name["lora_00"]["status"] == "ok"  # finished before any actor died
    # Adapters still queued when the second actor died are error rows; how many (possibly none) depends on timing.
    others = [r for r in rows if r["adapter"] != "lora_02"]
    assert all(r["status"] == "ok" or "no evaluation actor left" in r["error"] for r in others), others


@pytest.mark.slow
def test_ray_base_that_cannot_be_built_is_one_clear_error(suite, ray_cluster, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # passes the source check, fails in the actors
    with pytest.raises(RuntimeError, match="no evaluation actor could start"):
        dpeft.ray.evaluate_adapters(
            {"source": str(tmp_path)},
            [suite["paths"]["lora_00"]],
            suite["data"],
            num_actors=1,
            address=ray_cluster,
            progress=False,
        )
