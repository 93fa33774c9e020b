"""The `sharded` store backend: ZeRO-3 for adapter tensors only, over a data-parallel process group.

Every declared adapter tensor is split along dim 0 the way `torch.chunk` splits it (rank r holds rows
``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / W)``; trailing ranks may hold fewer rows, or none), and that local
shard is the `nn.Parameter` registered at the tensor's PEFT module path, so the optimizer, gradients and optimizer
state only ever see 1/W of each tensor. The split is the one `DTensor`'s ``Shard(0)`` uses, so distributed
checkpoints describe shards over the logical (unpadded) shapes and reshard to any world size.

Tensors are grouped in buckets (default: one transformer block of one adapter). The first `get` of a bucket in a
forward all-gathers the whole bucket in one collective (shards padded to equal size only inside that collective)
and starts the gather of the next bucket asynchronously; later entries of the bucket are served from that gather,
and the bucket's full copies are dropped once every entry has taken its tensors, so only autograd keeps them.
Backward reduce-scatters the bucket's gradients (averaged over ranks) into the shards' ``.grad``.

Copied modules (`modules_to_save`, adopted entries) run their own `forward` with their own parameters, so they stay
replicated: values are broadcast from rank 0 when sharding and their gradients are averaged over ranks by a hook.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

_BLOCK = re.compile(r"\.(?:layers|h|layer|blocks|block)\.(\d+)\.")


def block_index(module_name: str) -> int:
    """Transformer block index of a module name (``model.layers.3.self_attn.q_proj`` -> 3); -1 outside blocks."""
    found = _BLOCK.search(f".{module_name}.")
    return int(found.group(1)) if found else -1


@dataclass
class ShardLayout:
    """Where one tensor's shard lives: its logical shape and this rank's rows."""

    shape: tuple[int, ...]
    chunk: int  # rows per rank, ceil(n / W)
    start: int  # first logical row of this rank's shard
    rows: int  # rows this rank holds (may be 0)
    offset: int = 0  # element offset of this tensor inside the bucket's per-rank flat buffer

    @classmethod
    def of(cls, shape: tuple[int, ...], rank: int, world: int) -> ShardLayout:
        n = shape[0] if shape else 1
        chunk = math.ceil(n / world) if n else 0
        start = min(n, rank * chunk)
        return cls(tuple(shape), chunk, start, max(0, min(n, start + chunk) - start))

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def padded_numel(self) -> int:
        return self.chunk * self.row_numel

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.rows, *self.shape[1:])


@dataclass
class Bucket:
    """Tensors gathered together: (entry, tensor name) pairs, with one flat layout per rank."""

    key: tuple
    items: list[tuple[object, str]] = field(default_factory=list)
    layouts: list[ShardLayout] = field(default_factory=list)
    numel: int = 0  # per-rank flat size (padded)
    next: Bucket | None = None

    def shards(self) -> list[nn.Parameter]:
        return [entry.params[name] for entry, name in self.items]

    def versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.shards())


@dataclass
class _Gathered:
    """Full tensors of one bucket from one gather, handed out until every entry has taken its own."""

    token: int
    tensors: dict[int, dict[str, torch.Tensor]]  # id(entry) -> name -> full tensor
    remaining: set[int]
    versions: tuple[int, ...]
    grad_enabled: bool


class _GatherBucket(torch.autograd.Function):
    """All-gather of a bucket in forward; reduce-scatter (mean over ranks) of its gradients in backward."""

    @staticmethod
    def forward(ctx, backend: ShardedBackend, bucket: Bucket, token: int, gathered, *shards):
        ctx.backend, ctx.bucket, ctx.token = backend, bucket, token
        return tuple(backend.unflatten(bucket, gathered))

    @staticmethod
    def backward(ctx, *grads):
        backend, bucket = ctx.backend, ctx.bucket
        backend.invalidate(bucket, ctx.token)  # this forward's full copies must not be handed out again
        shard_grads = backend.reduce_scatter(bucket, grads) if any(ctx.needs_input_grad[4:]) else None
        if shard_grads is None:
            return (None, None, None, None) + (None,) * len(grads)
        needs = ctx.needs_input_grad[4:]
        return (None, None, None, None, *[g if need else None for g, need in zip(shard_grads, needs)])


class ShardedBackend:
    """Shards, gathers and reduces the declared tensors of an `AdapterStore` over `group`.

    Args:
        group: The data-parallel process group (None: the default group).
    """

    def __init__(self, group=None) -> None:
        if not dist.is_initialized():
            raise ValueError("the sharded backend needs a process group; call dpeft.dist.init_distributed() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.nccl = dist.get_backend(self.group) == "nccl"
        self.buckets: dict[tuple, Bucket] = {}
        # id(entry) -> [(bucket, item indices)]: one bucket per dtype the entry's tensors have (SHiRA's int indices).
        self._bucket_of_entry: dict[int, list[tuple[Bucket, list[int]]]] = {}
        self._cache: dict[tuple, _Gathered] = {}
        self._pending: dict[tuple, tuple[torch.Tensor, object, tuple[int, ...]]] = {}
        self._tokens = itertools.count()
        self._mesh = None
        # torch >= 2.10 renamed the flat collectives; the old names warn there.
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    # ---------------------------------------------------------------- sharding
    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Make `tensor` equal rank 0's copy (so every rank shards the same initial values, as DDP does)."""
        dist.broadcast(tensor.data, src=dist.get_global_rank(self.group, 0), group=self.group)

    def shard_entries(self, entries: list, bucket_of: Callable[[object], int], attach: Callable) -> None:
        """Replace each entry's full parameters by local shards, registered where the full ones were."""
        for entry in entries:
            for name, param in list(entry.params.items()):
                self.broadcast_(param)
                layout = ShardLayout.of(tuple(param.shape), self.rank, self.world)
                local = param.data[layout.start : layout.start + layout.rows].clone()
                shard = nn.Parameter(local, requires_grad=param.requires_grad)
                attach(entry, name, shard)
                entry.params[name] = shard
                key = (entry.adapter, bucket_of(entry), local.dtype, local.device)
                bucket = self.buckets.get(key)
                if bucket is None:
                    bucket = self.buckets[key] = Bucket(key)
                layout.offset = bucket.numel
                bucket.numel += layout.padded_numel
                bucket.items.append((entry, name))
                bucket.layouts.append(layout)
                places = self._bucket_of_entry.setdefault(id(entry), [])
                place = next((pl for pl in places if pl[0] is bucket), None)
                if place is None:
                    place = (bucket, [])
                    places.append(place)
                place[1].append(len(bucket.items) - 1)
            entry.sharded = True
        self._link_buckets()

    def _link_buckets(self) -> None:
        """Chain each adapter's buckets in block order so a gather can prefetch the next one."""
        by_adapter: dict[str, list[Bucket]] = {}
        # Modules outside the blocks (block -1: heads, embeddings) go last, so the last gather of a forward does
        # not prefetch the first block of the next forward, which an optimizer step would make stale.
        order = lambda k: (k[0], k[1] if k[1] >= 0 else math.inf, str(k[2]), str(k[3]))  # noqa: E731
        for key in sorted(self.buckets, key=order):
            by_adapter.setdefault(key[0], []).append(self.buckets[key])
        for chain in by_adapter.values():
            for a, b in zip(chain, chain[1:] + [None]):
                a.next = b

    def layout(self, entry, name: str) -> ShardLayout:
        bucket, idx = next(
            (b, i) for b, i in self._bucket_of_entry[id(entry)] if any(b.items[j][1] == name for j in i)
        )
        return next(bucket.layouts[i] for i in idx if bucket.items[i][1] == name)

    def forget(self, adapter: str) -> None:
        """Drop the buckets of a removed adapter."""
        for key in [k for k in self.buckets if k[0] == adapter]:
            for entry, _ in self.buckets[key].items:
                self._bucket_of_entry.pop(id(entry), None)
            self._cache.pop(key, None)
            self._pending.pop(key, None)
            del self.buckets[key]
        self._link_buckets()

    # ---------------------------------------------------------------- collectives
    def _flat_local(self, bucket: Bucket) -> torch.Tensor:
        shards = bucket.shards()
        flat = torch.zeros(bucket.numel, dtype=shards[0].dtype, device=shards[0].device)
        for shard, layout in zip(shards, bucket.layouts):
            if layout.rows:
                flat[layout.offset : layout.offset + shard.numel()].copy_(shard.detach().reshape(-1))
        return flat

    def _start_gather(self, bucket: Bucket, async_op: bool) -> tuple[torch.Tensor, object]:
        local = self._flat_local(bucket)
        out = torch.empty(self.world * bucket.numel, dtype=local.dtype, device=local.device)
        work = self._all_gather(out, local, group=self.group, async_op=async_op)
        return out, work

    def unflatten(self, bucket: Bucket, gathered: torch.Tensor) -> list[torch.Tensor]:
        """Full logical tensors from the all-gathered (W, per-rank flat) buffer."""
        rows = gathered.view(self.world, bucket.numel)
        out = []
        for layout in bucket.layouts:
            block = rows[:, layout.offset : layout.offset + layout.padded_numel]
            full = block.reshape(self.world * layout.chunk, *layout.shape[1:])[: layout.shape[0]]
            # A copy either way: no output may alias the gathered buffer (or another output).
            out.append((full.clone() if full.is_contiguous() else full.contiguous()).view(layout.shape))
        return out

    def reduce_scatter(self, bucket: Bucket, grads) -> list[torch.Tensor]:
        """Average the full gradients over ranks and return this rank's shard of each."""
        shards = bucket.shards()
        buf = torch.zeros(self.world, bucket.numel, dtype=shards[0].dtype, device=shards[0].device)
        for grad, layout in zip(grads, bucket.layouts):
            if grad is None:
                continue
            n, padded = layout.shape[0], self.world * layout.chunk
            rows = grad.reshape(n, layout.row_numel)
            if padded != n:
                rows = torch.cat([rows, rows.new_zeros(padded - n, layout.row_numel)])
            buf[:, layout.offset : layout.offset + layout.padded_numel].copy_(rows.view(self.world, -1))
        mine = self._reduce(buf)
        mine.div_(self.world)
        return [
            mine[layout.offset : layout.offset + layout.rows * layout.row_numel].view(layout.local_shape)
            for layout in bucket.layouts
        ]

    def _reduce(self, buf: torch.Tensor) -> torch.Tensor:
        if self._reduce_scatter is not None:
            out = torch.empty(buf.shape[1], dtype=buf.dtype, device=buf.device)
            try:
                self._reduce_scatter(out, buf.view(-1), group=self.group)
                return out
            except (RuntimeError, NotImplementedError):
                if self.nccl:
                    raise
                self._reduce_scatter = None  # an older gloo without reduce-scatter: all-reduce and keep our row
        dist.all_reduce(buf, group=self.group)
        return buf[self.rank].clone()

    # ---------------------------------------------------------------- forward
    def invalidate(self, bucket: Bucket, token: int) -> None:
        cached = self._cache.get(bucket.key)
        if cached is not None and cached.token == token:
            del self._cache[bucket.key]

    def get(self, entry) -> dict[str, torch.Tensor]:
        """Full tensors of a sharded entry, from its buckets' current gathers or new ones."""
        places = self._bucket_of_entry[id(entry)]
        if len(places) == 1:
            return self._get_from(entry, places[0][0])
        return {name: t for bucket, _ in places for name, t in self._get_from(entry, bucket).items()}

    def _get_from(self, entry, bucket: Bucket) -> dict[str, torch.Tensor]:
        cached = self._cache.get(bucket.key)
        grad = torch.is_grad_enabled()
        if (
            cached is None
            or id(entry) not in cached.remaining
            or cached.grad_enabled != grad
            or cached.versions != bucket.versions()
        ):
            cached = self._gather(bucket, grad)
        cached.remaining.discard(id(entry))
        if not cached.remaining:
            del self._cache[bucket.key]  # from here on only autograd keeps the full copies alive
        return cached.tensors[id(entry)]

    def _gather(self, bucket: Bucket, grad_enabled: bool) -> _Gathered:
        versions = bucket.versions()
        pending = self._pending.pop(bucket.key, None)
        gathered = None
        if pending is not None:
            out, work, pending_versions = pending
            work.wait()  # always complete the collective every rank started
            if pending_versions == versions:
                gathered = out
        if gathered is None:
            gathered, _ = self._start_gather(bucket, async_op=False)
        nxt = bucket.next
        if nxt is not None and nxt.key not in self._pending:
            out, work = self._start_gather(nxt, async_op=True)
            self._pending[nxt.key] = (out, work, nxt.versions())
        token = next(self._tokens)
        full = _GatherBucket.apply(self, bucket, token, gathered, *bucket.shards())
        tensors: dict[int, dict[str, torch.Tensor]] = {}
        for (entry, name), tensor in zip(bucket.items, full):
            tensors.setdefault(id(entry), {})[name] = tensor
        cached = _Gathered(token, tensors, set(tensors), versions, grad_enabled)
        self._cache[bucket.key] = cached
        return cached

    def drain(self) -> None:
        """Wait for prefetches nobody consumed and drop cached full copies (before checkpoints and teardown)."""
        for _, work, _ in self._pending.values():
            work.wait()
        self._pending.clear()
        self._cache.clear()

    # ---------------------------------------------------------------- state
    @torch.no_grad()
    def full_tensor(self, entry, name: str, local: torch.Tensor | None = None) -> torch.Tensor:
        """The full value of one sharded tensor, or of `local` shaped like its shard (a collective: every rank
        must call it)."""
        layout = self.layout(entry, name)
        shard = (entry.params[name] if local is None else local).detach()
        local = torch.zeros(layout.padded_numel, dtype=shard.dtype, device=shard.device)
        local[: shard.numel()].copy_(shard.reshape(-1))
        out = torch.empty(self.world * layout.padded_numel, dtype=shard.dtype, device=shard.device)
        self._all_gather(out, local, group=self.group)
        return out.view(self.world * layout.chunk, *layout.shape[1:])[: layout.shape[0]].clone()

    @torch.no_grad()
    def load_full(self, entry, name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's rows of a full tensor into the shard."""
        layout = self.layout(entry, name)
        entry.params[name].copy_(tensor[layout.start : layout.start + layout.rows])

    def dtensor(self, entry, name: str):
        """The shard as a `DTensor` with ``Shard(0)`` over the logical shape (what DCP saves and reshards)."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            self._mesh = DeviceMesh.from_group(self.group, "cuda" if self.nccl else "cpu", mesh_dim_names=("dp",))
        layout = self.layout(entry, name)
        return _as_dtensor(DTensor, Shard, self._mesh, entry.params[name].detach(), layout.shape)

    def as_dtensor(self, local: torch.Tensor, shape: tuple[int, ...]):
        """Another tensor sharded like a parameter of logical `shape` (e.g. its optimizer state) as a `DTensor`."""
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            self._mesh = DeviceMesh.from_group(self.group, "cuda" if self.nccl else "cpu", mesh_dim_names=("dp",))
        return _as_dtensor(DTensor, Shard, self._mesh, local, shape)

    def all_reduce_grad_hook(self) -> Callable[[nn.Parameter], None]:
        """A post-accumulate-grad hook that averages a replicated parameter's gradient over ranks."""

        def hook(param: nn.Parameter) -> None:
            dist.all_reduce(param.grad, group=self.group)
            param.grad.div_(self.world)

        return hook


def _as_dtensor(DTensor, Shard, mesh, local: torch.Tensor, shape: tuple[int, ...]):
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def adapter_state_bytes(store, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for adapter parameters, their gradients and the optimizer's state of them.

    Returns:
        ``{"params": ..., "grads": ..., "optimizer": ..., "total": ...}`` (gradients that are None count 0).
    """
    params = list(store.parameters())
    ids = {id(p) for p in params}
    out = {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": 0,
    }
    if optimizer is not None:
        for param, state in optimizer.state.items():
            if id(param) in ids:
                out["optimizer"] += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out
