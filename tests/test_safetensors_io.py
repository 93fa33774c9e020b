"""dpeft's safetensors writer: byte-identical to `safetensors.torch.save_file`, round trips every dtype, accepts
views, publishes atomically; and the cheap finiteness half of the integrity check used on one-process saves."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import _TYPES, load_file, save_file

import dpeft
from dpeft.store import safetensors_io
from dpeft.store.integrity import AdapterIntegrityError, nonfinite_counts, verify_full_state
from dpeft.store.peft_io import load_adapter_weights, save_adapter_weights
from dpeft.store.safetensors_io import save_safetensors

META = {"format": "pt"}


def _every_dtype() -> dict[str, torch.Tensor]:
    """One tensor of every dtype safetensors knows, plus a scalar, empty tensors and a non-ASCII name."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in _TYPES.items():
        values = torch.randint(0, 2 if dtype == torch.bool else 100, (3, 5), generator=gen)
        out[f"t.{name}"] = values.to(dtype) if dtype != torch.complex64 else torch.complex(values * 1.0, -values * 0.5)
    out.update(
        {
            "scalar": torch.tensor(3.25),
            "empty": torch.zeros(0, 4),
            "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
            "z.é": torch.randn(2, 3, generator=gen),
            "A": torch.randn(4, generator=gen, dtype=torch.float64),
        }
    )
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (float8 and NaN-safe): dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_byte_identical_to_save_file_for_every_dtype(tmp_path):
    tensors = _every_dtype()
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata=META)
    save_file(tensors, tmp_path / "theirs.safetensors", metadata=META)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    back = load_file(tmp_path / "ours.safetensors")
    assert list(back) == list(load_file(tmp_path / "theirs.safetensors"))
    assert set(back) == set(tensors) and all(_same(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.bool])
def test_round_trip_of_adapter_dtypes(tmp_path, dtype):
    gen = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        value = torch.randn(7, 9, generator=gen).to(dtype)
        value[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])  # the writer stores bits, not values
    else:
        value = torch.randint(-128 if dtype == torch.int8 else 0, 2 if dtype == torch.bool else 128, (7, 9))
        value = value.to(dtype)
    save_safetensors({"w": value, "e": torch.zeros(0, dtype=dtype)}, tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")
    assert _same(back["w"], value) and _same(back["e"], torch.zeros(0, dtype=dtype))


def test_views_shared_storage_and_grad_tensors(tmp_path):
    """save_file refuses non-contiguous and memory-sharing tensors; the writer stores each view's own values."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    tensors = {
        "t": base.t(),  # non-contiguous
        "rows": base[2:4],  # contiguous, nonzero storage offset, shares base's memory
        "cols": base[:, 1::3],  # strided
        "base": base,
        "param": torch.nn.Parameter(torch.ones(3)),  # requires grad
        "conj": torch.complex(torch.ones(2), torch.ones(2)).conj(),  # a lazily conjugated view
    }
    save_safetensors(tensors, tmp_path / "v.safetensors", metadata=META)
    back = load_file(tmp_path / "v.safetensors")
    assert all(torch.equal(back[k], v.detach().resolve_conj()) for k, v in tensors.items())
    dense = {k: v.detach().resolve_conj().contiguous().clone() for k, v in tensors.items()}
    save_file(dense, tmp_path / "d.safetensors", metadata=META)
    assert (tmp_path / "v.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()


def test_metadata_and_bad_input(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"a": torch.ones(2)}, path, metadata={"format": "pt", "note": "é ok", "n": "3"})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "é ok", "n": "3"}
    save_safetensors({"a": torch.ones(2)}, tmp_path / "none.safetensors")
    with safe_open(tmp_path / "none.safetensors", "pt") as f:
        assert not f.metadata()
    cases = [
        (TypeError, "str to str", {"a": torch.ones(1)}, {"format": 1}),
        (ValueError, "reserves", {"__metadata__": torch.ones(1)}, None),
        (ValueError, "complex128", {"a": torch.ones(1, dtype=torch.complex128)}, None),
        (ValueError, "to_dense", {"a": torch.eye(2).to_sparse()}, None),
        (TypeError, "expected a torch.Tensor", {"a": [1.0]}, None),
        (TypeError, "keys are strings", {1: torch.ones(1)}, None),
    ]
    for exc, words, tensors, metadata in cases:
        with pytest.raises(exc, match=words):
            save_safetensors(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    assert not (tmp_path / "bad.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "none.safetensors"]  # no temporary file left


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "adapter_model.safetensors"
    save_safetensors({"a": torch.ones(1000)}, path)
    before = path.read_bytes()

    def broken(fd, buffers):
        os.write(fd, bytes(buffers[0])[:10])  # part of the file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "_write_all", broken)
    with pytest.raises(OSError, match="No space"):
        save_safetensors({"a": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_short_writes_and_many_buffers(tmp_path, monkeypatch):
    """A writev that writes less than asked (signals, pipes, huge files) and the per-call buffer cap are resumed."""
    calls = []

    def short(fd, buffers):  # what a short writev does: only a prefix of the buffers' concatenation goes out
        calls.append(len(buffers))
        return os.write(fd, b"".join(bytes(b) for b in buffers)[:37])

    monkeypatch.setattr(os, "writev", short)
    monkeypatch.setattr(safetensors_io, "_IOV_MAX", 3)
    tensors = {f"k{i:02d}": torch.randn(i + 5) for i in range(20)}
    save_safetensors(tensors, tmp_path / "s.safetensors", metadata=META)
    monkeypatch.undo()
    save_file(tensors, tmp_path / "r.safetensors", metadata=META)
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
    assert max(calls) <= 3 and len(calls) > 20


def test_published_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_safetensors({"a": torch.ones(1)}, tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "p.safetensors").st_mode & 0o777 == 0o640


def test_save_pretrained_writes_save_files_bytes(tmp_path):
    """The whole save path: the adapter file equals safetensors' own file of the same state dict, byte for byte."""
    from models import build

    base, _ = build("mlp")
    torch.manual_seed(0)
    model = dpeft.get_peft_model(base, dpeft.LoraConfig(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False))
    model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "a")
    state = {k: v.contiguous() for k, v in dpeft.get_peft_model_state_dict(model).items()}
    save_file(state, tmp_path / "raw.safetensors", metadata=META)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "raw.safetensors").read_bytes()


def test_bin_format_is_atomic_and_dense(tmp_path):
    big = torch.arange(100.0)
    path = save_adapter_weights({"v": big[:3], "w": big[10:20].reshape(2, 5).t()}, tmp_path, safe_serialization=False)
    assert os.path.getsize(path) < 2000  # the views were saved, not the 100-element storage behind them
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.bin"]
    back = load_adapter_weights(str(tmp_path))
    assert torch.equal(back["v"], big[:3]) and torch.equal(back["w"], big[10:20].reshape(2, 5).t())


# ---------------------------------------------------------------------------------------- finiteness check
def test_nonfinite_counts_exact_and_free_of_false_alarms():
    found = nonfinite_counts(
        {
            "nan": torch.tensor([1.0, float("nan"), 2.0, float("nan")]),
            "neg_inf_bf16": torch.tensor([float("-inf"), 1.0, float("-inf")], dtype=torch.bfloat16),
            "inf_f16": torch.tensor([float("inf"), 0.0], dtype=torch.float16),
            "huge_f32": torch.full((8,), 3e38),  # finite, but its float32 norm overflows: counted exactly, 0 bad
            "large_f16": torch.full((64,), 60000.0, dtype=torch.float16),  # a float16 norm would overflow
            "tiny": torch.full((5,), 1e-30),
            "int": torch.tensor([1, 2], dtype=torch.int8),
            "empty": torch.zeros(0),
        }
    )
    bad = {k: v[0] for k, v in found.items()}
    assert bad == {
        "nan": 2,
        "neg_inf_bf16": 2,
        "inf_f16": 1,
        "huge_f32": 0,
        "large_f16": 0,
        "tiny": 0,
        "int": 0,
        "empty": 0,
    }
    assert all(math.isnan(v[1]) for v in found.values())


def test_one_process_save_checks_the_live_tensors_themselves():
    """When the saved tensor is the model's own (no gather), a non-finite value is still caught and named."""
    good, bad = torch.randn(4, 3), torch.randn(2, 3)
    bad[1, 2] = float("inf")
    huge = torch.full((3,), 1e38)  # finite, its float32 sum of squares is not: no false alarm
    live = {"good": ((4, 3), good), "bad": ((2, 3), bad), "huge": ((3,), huge)}
    with pytest.raises(AdapterIntegrityError, match=r"refusing to save adapter 'x': bad: 1 non-finite") as err:
        verify_full_state("x", {"good": good, "bad": bad, "huge": huge}, live)
    assert "good" not in str(err.value) and "huge" not in str(err.value)
    verify_full_state("x", {"good": good, "huge": huge}, {"good": ((4, 3), good), "huge": ((3,), huge)})


def test_config_write_is_atomic(tmp_path):
    """adapter_config.json is never left half-written: a value JSON cannot hold fails before the old file changes."""
    config = dpeft.LoraConfig(r=4, target_modules=["lin0"])
    config.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_text()
    with pytest.raises(TypeError):
        config.save_pretrained(tmp_path, auto_mapping={"bad": object()})
    assert (tmp_path / "adapter_config.json").read_text() == before and os.listdir(tmp_path) == ["adapter_config.json"]
