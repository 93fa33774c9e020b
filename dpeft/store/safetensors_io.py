"""A safetensors writer that writes straight from each tensor's memory and publishes the file atomically.

The file is what `safetensors.torch.save_file` writes, byte for byte (same tensor order, same header), so
`safetensors`, HF PEFT and the Hub read it unchanged. Format facts (from the safetensors spec): an 8-byte
little-endian header length; a JSON header, padded with spaces to a multiple of 8 bytes, mapping each name to its
``dtype``, ``shape`` and ``data_offsets`` (plus an optional ``__metadata__`` map of strings); then the raw
little-endian bytes of every tensor in header order. safetensors orders tensors by dtype (its own ranking, largest
first) and then by name.

Why not `save_file`: it stages the data through a copy buffer and pays per-tensor numpy/ctypes work; here the
header is built once and every tensor's own bytes go to the kernel in one ``writev``. The file is written under a
temporary name in the destination directory and renamed over the target only when complete: a crash or error
mid-write never leaves a half-written file under the real name (the previous file, if any, stays intact).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence

import torch

from dpeft.config.atomic_file import publish_atomically

#: torch dtype -> safetensors dtype name; the order is safetensors' own dtype ranking, highest first, which is the
#: order tensors of different dtypes appear in its files (checked byte for byte in tests/test_safetensors_io.py).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_RANK = {dtype: i for i, dtype in enumerate(DTYPE_NAMES)}
_METADATA_KEY = "__metadata__"
_SWAP_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# Linux caps one writev at IOV_MAX buffers (1024); other systems may allow fewer.
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` in the safetensors format, atomically (temporary file, then rename).

    Accepts what `safetensors.torch.save_file` accepts and also non-contiguous tensors, tensors that share memory
    and tensors on other devices (each is written as its own dense CPU copy in the file).

    Args:
        tensors: name -> tensor of a dtype safetensors knows (floats, ints, bool, float8).
        path: the file to write; an existing file there is replaced only once the new one is complete.
        metadata: string -> string map stored as the header's ``__metadata__`` (e.g. ``{"format": "pt"}``).

    Raises:
        TypeError: a value is not a tensor, or metadata is not a map of strings.
        ValueError: a name or dtype that safetensors cannot store, or a sparse tensor.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"expected a dict of name -> tensor, got {type(tensors).__name__}")
    dense = {name: _dense(name, tensor) for name, tensor in tensors.items()}
    order = sorted(dense, key=lambda name: (_RANK[dense[name].dtype], name))
    rows = [
        (n, DTYPE_NAMES[dense[n].dtype], dense[n].shape, dense[n].numel() * dense[n].element_size()) for n in order
    ]
    buffers = [encode_header(rows, metadata)]
    # `dense` holds the tensors behind `buffers` (views of their memory) until every byte is written.
    buffers += [_bytes(dense[name]) for name in order if dense[name].numel()]
    publish_atomically(path, lambda fd: _write_all(fd, buffers))


def encode_header(
    rows: Iterable[tuple[str, str, Sequence[int], int]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The 8-byte length and the space-padded JSON header of a file storing, in order, each (name, safetensors
    dtype name, shape, byte count) of `rows` (used for adapter files and for the merge tool's shards)."""
    header: dict[str, object] = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; not {bad!r}: convert the values to strings")
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name, dtype, shape, nbytes in rows:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _dense(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(name, str):
        raise TypeError(f"safetensors keys are strings; got {name!r} ({type(name).__name__})")
    if name == _METADATA_KEY:
        raise ValueError(f"a tensor cannot be named {_METADATA_KEY!r}: the format reserves it; rename the key")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{name!r}: a {tensor.layout} tensor cannot be saved; call .to_dense() first")
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(
            f"{name!r}: dtype {tensor.dtype} has no safetensors type; supported: {', '.join(map(str, DTYPE_NAMES))}"
        )
    # Each step is skipped when it has nothing to do: this runs once per tensor on every save.
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj() or tensor.is_neg():  # lazy conjugate/negative views have no dense bytes of their own
        tensor = tensor.resolve_conj().resolve_neg()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in the file's (little-endian) order; on little-endian hosts its own memory, no copy.

    The view does not keep `tensor` alive: the caller holds the tensor until the bytes are written. (A ctypes view
    of the data pointer costs ~3 us; a dtype-changing `Tensor.view` + numpy ~13 us, per tensor on every save.)
    """
    if sys.byteorder == "big" and tensor.element_size() > 1:  # swap within each scalar (complex: each half)
        width = tensor.element_size() // (2 if tensor.is_complex() else 1)
        return memoryview(tensor.reshape(-1).view(_SWAP_VIEW[width]).numpy().byteswap()).cast("B")
    return memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")


def _write_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    """Write every buffer in order, in as few system calls as the platform allows; short writes are resumed."""
    writev = getattr(os, "writev", None)
    pending = [b if isinstance(b, memoryview) else memoryview(b) for b in buffers]
    first = 0
    while first < len(pending):
        batch = pending[first : first + _IOV_MAX]
        written = writev(fd, batch) if writev is not None else os.write(fd, batch[0])
        if written <= 0:
            raise OSError(f"writing the safetensors file made no progress ({written} bytes written)")
        while written:  # drop what went out; keep the unwritten tail of a partly written buffer
            head = pending[first]
            if written < len(head):
                pending[first] = head[written:]
                break
            written -= len(head)
            first += 1
