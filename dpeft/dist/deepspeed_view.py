"""`DeepSpeedView`: how the adapter store reads and writes tensors that DeepSpeed ZeRO partitions.

`dpeft.dist.deepspeed.apply_deepspeed` (or `attach_prepared`) hands one to `AdapterStore.use_deepspeed`; the store
calls it for full values, for the ``Shard(0)`` rows of distributed checkpoints and for writes, and the checkpoint
layer calls it for the optimizer state (see the `dpeft.dist.deepspeed` module docstring for the why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Full values of ZeRO-3 `params` inside the block on every rank (a collective); with `modify`, values written
    there (the same on every rank) are kept: rank 0's are broadcast and re-partitioned on exit."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


class DeepSpeedView:
    """How the store reads and writes tensors that DeepSpeed partitions (set by `apply_deepspeed`).

    Args:
        stage: ZeRO stage (2: parameters full on every rank; 3: flat partitions, ``param.ds_tensor``).
        optimizer: DeepSpeed's ZeRO optimizer, whose fp32 master copies and state hold the trained values.
    """

    def __init__(self, stage: int, optimizer) -> None:
        self.stage = stage
        self.optimizer = optimizer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._mesh = None

    # ---------------------------------------------------------------- parameters
    def partitioned(self, param: nn.Parameter) -> bool:
        """Whether ZeRO-3 partitions `param`: not ZeRO-2's, nor a store tensor registered under no module (SHiRA's
        indices), which ``deepspeed.initialize`` never saw and every rank keeps whole."""
        return self.stage == 3 and hasattr(param, "ds_tensor")

    def full_tensor(self, param: nn.Parameter) -> torch.Tensor:
        """The full value of `param` (the model's copy, which the forward uses); a collective under ZeRO-3."""
        if not self.partitioned(param):
            return param.detach()
        with gathered([param]):
            return param.detach().clone()

    def live(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor as this rank holds it, for integrity checks: ZeRO-3's flat partition as a sharded `DTensor`
        (its statistics are summed over ranks), the full parameter where it is not partitioned."""
        if not self.partitioned(param):
            return param.detach()
        # Partitions are equal-sized; the last ones are padded past the tensor's end with uninitialised memory.
        part = param.ds_tensor.detach().reshape(-1)
        valid = max(0, min(part.numel(), param.ds_numel - self.rank * part.numel()))
        return self._dtensor(part[:valid], (param.ds_numel,))

    def dtensor(self, param: nn.Parameter, shape: tuple[int, ...]):
        """This rank's ``torch.chunk`` rows of `param` as a ``Shard(0)`` `DTensor` over `shape` (a copy)."""
        full = self.full_tensor(param)
        return self._dtensor(self._rows(full, shape).clone(), shape)

    @torch.no_grad()
    def load_full(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Set `param` (model copy and, if trained, fp32 master) from its full value; every rank calls this."""
        value = value.detach().to(param.device)
        if not self.partitioned(param):
            param.data.copy_(value.to(param.dtype).view(param.shape))
        else:
            with gathered([param], modify=True):
                param.data.copy_(value.to(param.dtype).view(param.ds_shape))
        if param.requires_grad:
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(param, value.float().view(param.shape if self.stage == 2 else param.ds_shape))

    def load_rows(self, param: nn.Parameter, rows: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Set `param` from this rank's ``Shard(0)`` rows of it (all ranks call this: the rows are all-gathered)."""
        self.load_full(param, self._unrows(rows, shape))

    # ---------------------------------------------------------------- optimizer state
    def optimizer_state(self, store) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors for DCP, manifest entry) in `dpeft.checkpoint.dcp_optim`'s format: one group over the store's
        trainable tensors, each state tensor shaped like its parameter saved as ``Shard(0)`` rows."""
        from deepspeed.utils import safe_get_full_optimizer_state

        keys = store.param_keys()
        params = store.optimizer_parameters()
        names, step = self._state_names()
        tensors: dict[str, Any] = {}
        meta_state = {}
        for param in params:
            key, shape, _ = keys[id(param)]
            entries = {}
            for name in names:
                full = safe_get_full_optimizer_state(param, name).view(shape)
                tensors[_optim_key(key, name)] = self._dtensor(self._rows(full, shape).clone(), shape)
                entries[name] = {"kind": "param", "shape": list(shape), "dtype": str(full.dtype)[6:]}
            if step is not None:
                tensors[_optim_key(key, "step")] = step.detach().clone()
                entries["step"] = {"kind": "tensor", "shape": list(step.shape), "dtype": str(step.dtype)[6:]}
            meta_state[key] = entries
        group = {k: _json(v) for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        group["params"] = [keys[id(p)][0] for p in params]
        cls = type(self.optimizer.optimizer).__name__
        return tensors, {"class": cls, "param_groups": [group], "state": meta_state}

    def load_optimizer_state(self, store, meta: dict[str, Any], path: str, stage: str, loaded=None) -> dict:
        """``stage="prepare"``: check and return placeholders for DCP; ``"apply"``: write them into DeepSpeed."""
        keys = store.param_keys()
        params = store.optimizer_parameters()
        mine = [keys[id(p)][0] for p in params]
        cls = type(self.optimizer.optimizer).__name__
        saved = [k for g in meta["param_groups"] for k in g["params"]]
        if meta["class"] != cls or saved != mine:
            raise ValueError(
                f"checkpoint {path!r} holds {meta['class']} state for {len(saved)} parameters; this DeepSpeed "
                f"optimizer is {cls} over {len(mine)}. Build the same optimizer on model.store.optimizer_parameters()"
            )
        if stage == "prepare":
            return self._placeholders(params, keys, meta)
        from deepspeed.utils import safe_set_full_optimizer_state

        self._ensure_state({n for info in meta["state"].values() for n, i in info.items() if i["kind"] == "param"})
        step = None
        for param in params:
            key, shape, _ = keys[id(param)]
            for name, info in meta["state"].get(key, {}).items():
                value = loaded[_optim_key(key, name)]
                if info["kind"] == "param":
                    full = self._unrows(value.to_local(), shape).float()
                    safe_set_full_optimizer_state(param, full.view(self._flat_shape(param)), name)
                elif name == "step":
                    step = value
        hyper = {k: v for k, v in meta["param_groups"][0].items() if k != "params"}
        for group in self.optimizer.param_groups:
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in hyper.items()})
        if step is not None:
            for state in self.optimizer.optimizer.state.values():
                if "step" in state:
                    state["step"] = step.clone() if torch.is_tensor(state["step"]) else type(state["step"])(step)
        return {}

    def _placeholders(self, params, keys, meta) -> dict[str, Any]:
        out = {}
        for param in params:
            key, shape, _ = keys[id(param)]
            for name, info in meta["state"].get(key, {}).items():
                if info["kind"] == "param":
                    rows = self._rows(torch.empty(shape, dtype=getattr(torch, info["dtype"])), shape)
                    out[_optim_key(key, name)] = self._dtensor(rows.clone(), shape)
                elif info["kind"] == "tensor":
                    out[_optim_key(key, name)] = torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]))
        return out

    def _ensure_state(self, names: set[str]) -> None:
        """Give the base optimizer zero state for `names` where it has none yet (ZeRO-3 creates it lazily at the
        first step), so a checkpoint can be loaded into an engine that has not stepped."""
        # ZeRO-3 puts its flat fp32 partitions into the base optimizer's param groups only during a step.
        opt = self.optimizer
        flats = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
        for flat in flats:
            state = opt.optimizer.state[flat]
            for name in names - set(state):
                state[name] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state.setdefault("step", torch.tensor(0.0))

    def _state_names(self) -> tuple[list[str], torch.Tensor | None]:
        """Names of the base optimizer's per-element state (``exp_avg``...) and its step counter, if any."""
        for flat, state in self.optimizer.optimizer.state.items():
            names = [n for n, v in state.items() if torch.is_tensor(v) and v.numel() == flat.numel() and n != "step"]
            step = state.get("step")
            return names, (torch.as_tensor(step, dtype=torch.float32) if step is not None else None)
        return [], None

    def _flat_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        return tuple(param.ds_shape) if self.stage == 3 else tuple(param.shape)

    # ---------------------------------------------------------------- rows <-> DTensor
    def _rows(self, full: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        n = shape[0] if shape else 1
        chunk = -(-n // self.world) if n else 0
        start = min(n, self.rank * chunk)
        return full.reshape(shape)[start : min(n, start + chunk)]

    def _unrows(self, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The full tensor from every rank's ``torch.chunk`` rows (an all-gather, padded to equal sizes)."""
        n = shape[0] if shape else 1
        chunk = -(-n // self.world) if n else 0
        row = rows.reshape(-1, *shape[1:]) if shape else rows.reshape(-1)
        padded = torch.zeros((chunk, *shape[1:]), dtype=rows.dtype, device=rows.device)
        padded[: row.shape[0]].copy_(row)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat(out)[:n].reshape(shape)

    def _dtensor(self, local: torch.Tensor, shape: tuple[int, ...]):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            device = "cuda" if local.is_cuda else "cpu"
            self._mesh = DeviceMesh.from_group(dist.group.WORLD, device, mesh_dim_names=("dp",))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            local, self._mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )


def _optim_key(param_key: str, name: str) -> str:
    return f"optim/{param_key.removeprefix('adapter/')}/{name}"


def _json(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    return list(value) if isinstance(value, tuple) else value
