"""RunConfig: YAML loading, dotted overrides, and the errors a user sees for bad input."""

from __future__ import annotations

import os

import pytest

from dpeft.config.run_config import RunConfig, field_docs, load_run_config, parse_overrides
from dpeft.train.setup import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_every_shipped_config_loads_and_validates():
    for name in ("quickstart.yaml", "smollm2_qa.yaml", "tiny_llama.yaml"):
        path = os.path.join(ROOT, "configs", name)
        cfg = load_run_config(path)
        with open(path) as f:
            assert f.readline().strip() == f"# dpeft train --config configs/{name}", "header must be the command"
        if cfg.model.source != "smollm2-135m":
            validate(cfg)


def test_yaml_values_and_overrides(tmp_path):
    path = _write(
        tmp_path,
        "train:\n  steps: 7\n  global_batch_size: 4\noptim:\n  lr: 1e-3\npeft:\n  peft_type: LORA\n"
        "  r: 8\n  target_modules: [q_proj]\n",
    )
    cfg = load_run_config(
        path,
        [
            "train.steps=12",
            "peft.r=4",
            "optim.schedule=cosine",
            "checkpoint.keep_last=null",
            "train.eval_metrics=[loss, perplexity]",
        ],
    )
    assert cfg.train.steps == 12 and cfg.train.global_batch_size == 4
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)  # PyYAML reads 1e-3 as a str
    assert cfg.peft == {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}  # merged, not replaced
    assert cfg.optim.schedule == "cosine" and cfg.checkpoint.keep_last is None
    assert cfg.train.eval_metrics == ["loss", "perplexity"]
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_parse_overrides_nests_and_parses_yaml_scalars():
    assert parse_overrides(["a.b.c=3", "a.b.d=true", "x=1.5", "s=hello"]) == {
        "a": {"b": {"c": 3, "d": True}},
        "x": 1.5,
        "s": "hello",
    }
    with pytest.raises(ValueError, match="section.field=value"):
        parse_overrides(["train.steps"])


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stepz'\] in section 'train'.*global_batch_size"):
        load_run_config(_write(tmp_path, "train:\n  stepz: 3\n"))
    with pytest.raises(ValueError, match=r"\['modle'\] at the top level; valid keys: \['checkpoint', 'data'"):
        load_run_config(None, ["modle.source=x"])


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"train.steps must be int, got str 'many'"):
        load_run_config(_write(tmp_path, "train:\n  steps: many\n"))
    with pytest.raises(ValueError, match=r"train.steps must be int, got float 2.5"):
        load_run_config(None, ["train.steps=2.5"])
    with pytest.raises(ValueError, match=r"optim.schedule='step' is not allowed; choose one of \['constant'"):
        load_run_config(None, ["optim.schedule=step"])
    with pytest.raises(ValueError, match=r"train.progress_bar must be bool"):
        load_run_config(None, ["train.progress_bar=3"])
    with pytest.raises(ValueError, match=r"train must be a mapping of TrainSection fields"):
        load_run_config(None, ["train=3"])
    with pytest.raises(ValueError, match="does not exist"):
        load_run_config(str(tmp_path / "missing.yaml"))


def test_missing_data_file_is_a_clear_error_before_anything_runs(tmp_path):
    cfg = load_run_config(None, [f"data.source={tmp_path}/nope.jsonl", f"output.dir={tmp_path}/out"])
    with pytest.raises(ValueError, match=r"nope.jsonl' is neither a packaged dataset \['chatterbot_qa', 'hamlet'"):
        validate(cfg)
    cfg = load_run_config(None, ["model.source=/no/such/model"])
    with pytest.raises(ValueError, match="neither a packaged model"):
        validate(cfg)
    with pytest.raises(ValueError, match="multiple of train.grad_accum_steps"):
        validate(load_run_config(None, ["train.global_batch_size=6", "train.grad_accum_steps=4"]))
    with pytest.raises(ValueError, match="accuracy .seq_cls only"):
        validate(load_run_config(None, ["train.eval_metrics=[accuracy]"]))
    assert not os.path.exists(tmp_path / "out")


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) >= 35
    undocumented = [key for key, _, doc in rows if len(doc) < 10]
    assert not undocumented, undocumented
    assert ("train.steps", "100", "Optimizer steps.") in rows


def test_cli_reports_config_errors_in_one_line_and_prints_the_resolved_config(capsys):
    from dpeft.cli.main import main

    with pytest.raises(
        SystemExit, match=r"dpeft train: error: unknown config key\(s\) \['stepz'\] in section 'train'"
    ):
        main(["train", "--config", os.path.join(ROOT, "configs", "tiny_llama.yaml"), "train.stepz=3"])
    main(["train", "--config", os.path.join(ROOT, "configs", "tiny_llama.yaml"), "--print-config", "peft.r=4"])
    out = capsys.readouterr().out
    assert "  r: 4\n" in out and "source: tiny-llama" in out and out.count("\n") > len(field_docs()) - 5
