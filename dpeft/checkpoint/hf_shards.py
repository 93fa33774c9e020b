"""Hugging Face safetensors checkpoints, read lazily and written tensor by tensor.

Reading parses each file's header once (names, dtypes, shapes, byte offsets) and reads one tensor's bytes on
demand, so memory holds one tensor at a time. Writing lays out a shard's header from the plan before any data
exists, then streams each tensor's bytes after it: a shard is never assembled in memory, and the same plan gives
the same bytes in any process.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from dpeft.store.safetensors_io import DTYPE_NAMES, encode_header

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_COPY_CHUNK = 16 << 20  # raw copies move at most this many bytes through memory at once

#: safetensors dtype name -> torch dtype (the store's writer holds the table).
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file (in storage order) and its ``__metadata__``."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path}: unreadable safetensors header ({exc}); the file is corrupt or truncated"
            ) from exc
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    infos = [
        TensorInfo(
            k,
            path,
            v["dtype"],
            tuple(v["shape"]),
            start + v["data_offsets"][0],
            v["data_offsets"][1] - v["data_offsets"][0],
        )
        for k, v in header.items()
    ]
    infos.sort(key=lambda i: i.begin)
    return {i.name: i for i in infos}, meta


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a fresh CPU tensor (nothing else of the file is loaded)."""
    if info.dtype not in DTYPES:
        raise ValueError(f"{info.file}: tensor {info.name} has dtype {info.dtype}, which dpeft cannot read")
    tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype])
    if info.nbytes:
        with open(info.file, "rb", buffering=0) as f:  # unbuffered: straight into the tensor's memory
            f.seek(info.begin)
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < info.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{info.file} is truncated: tensor {info.name} is incomplete")
                done += n
    return tensor


class TensorFiles:
    """Named tensors across one or more safetensors files, read lazily.

    Args:
        files: The files; a name in two files is an error.
    """

    def __init__(self, files: Iterable[str]) -> None:
        self.files = list(files)
        self.infos: dict[str, TensorInfo] = {}
        for path in self.files:
            infos, _ = read_header(path)
            for name, info in infos.items():
                if name in self.infos:
                    raise ValueError(f"tensor {name} is in both {self.infos[name].file} and {path}")
                self.infos[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def keys(self) -> list[str]:
        """Names in storage order: file by file, by offset within a file."""
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.infos[name])


def base_weight_files(directory: str) -> list[str]:
    """The safetensors files of a HF model folder (single file, or the shards its index names)."""
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'; it is not a safetensors index")
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise ValueError(f"{index} names shard files that are missing from {directory}: {missing[:4]}")
        return [os.path.join(directory, n) for n in files]
    if os.path.isfile(single):
        return [single]
    has_bin = any(n.endswith(".bin") for n in os.listdir(directory)) if os.path.isdir(directory) else False
    hint = " It holds .bin weights only: save it with safe_serialization=True first." if has_bin else ""
    raise ValueError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory!r}.{hint}")


# ---------------------------------------------------------------------------------------------- output planning
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"2GB"`` (powers of ten, as transformers) or ``"500MiB"``."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read size {size!r}; write e.g. '2GB', '500MB' or '512MiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Split `tensors` (in their order) into shards of at most `max_bytes` (a larger tensor gets its own shard).

    The plan depends only on names, shapes and dtypes, so every rank computes the same one.
    """
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_file_names(n: int) -> list[str]:
    """transformers' names: ``model.safetensors`` for one file, else ``model-00001-of-0000N.safetensors``."""
    if n == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def assign_shards(sizes: list[int], world_size: int) -> list[list[int]]:
    """Shard indices per rank, balancing bytes: largest shard first onto the least-loaded rank (ties: lowest)."""
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owned[rank].append(i)
        load[rank] += sizes[i]
    return [sorted(o) for o in owned]


def write_index(directory: str, shards: list[list[OutTensor]], names: list[str]) -> None:
    """transformers' ``model.safetensors.index.json`` for a multi-file output."""
    weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


class ShardWriter:
    """Writes one safetensors file whose tensors are known in advance, one tensor at a time, in plan order.

    Args:
        path: The file to write.
        tensors: Its tensors, in the order they will be written.
        metadata: The header's ``__metadata__``.
    """

    def __init__(self, path: str, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.tensors = tensors
        self._next = 0
        header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], metadata or {"format": "pt"})
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(header)

    def _expect(self, name: str) -> OutTensor:
        if self._next >= len(self.tensors) or self.tensors[self._next].name != name:
            want = self.tensors[self._next].name if self._next < len(self.tensors) else "nothing"
            raise AssertionError(f"{self.path}: wrote {name}, plan expects {want}")
        self._next += 1
        return self.tensors[self._next - 1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (it must have the planned dtype and shape)."""
        t = self._expect(name)
        assert DTYPE_NAMES[tensor.dtype] == t.dtype and tuple(tensor.shape) == t.shape, (name, tensor.dtype, t)
        if t.nbytes:
            self._file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)

    def copy_raw(self, name: str, info: TensorInfo) -> None:
        """Append a tensor unchanged from a source file, moving its bytes in bounded chunks."""
        t = self._expect(name)
        assert info.nbytes == t.nbytes and info.dtype == t.dtype, (name, info, t)
        with open(info.file, "rb") as src:
            src.seek(info.begin)
            left = info.nbytes
            while left:
                chunk = src.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise ValueError(f"{info.file} is truncated: tensor {info.name} is incomplete")
                self._file.write(chunk)
                left -= len(chunk)

    def close(self) -> None:
        """Check every planned tensor was written, then flush the file to disk."""
        if self._next != len(self.tensors):
            raise AssertionError(f"{self.path}: {len(self.tensors) - self._next} planned tensors were not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
