"""Integrity of adapter tensors before anything is published: shape, finiteness, and agreement with the model.

HF PEFT's users meet adapters saved as ``[0]``-shaped or all-zero tensors after FSDP or ZeRO-3 runs: the saved
value came from a gather that did not happen (or a released partition), not from the trained tensor. Every save
path of dpeft goes through `verify_full_state` (the store's `state_dict`) or `verify_sharded_state` (distributed
checkpoints), which check each tensor against what the store knows without any method-specific rule:

- its shape is the logical shape its `ParamSpec` declares (which the adapter config implies);
- every element is finite;
- its values agree with the tensor as the ranks hold it: the sum of squares of the saved full tensor equals the
  sum over ranks of the squares of their parts (shards or `DTensor` local shards). A tensor the ranks hold as
  nonzero (trained, or initialised nonzero) that comes out all zero, or different, is a broken gather. A saved
  tensor that *is* the held tensor (one process, no gather) cannot disagree with it, so a one-process save pays only
  the finiteness pass (`nonfinite_counts`: one float32 multi-tensor norm, exact float64 counting only on failure).

A violation raises `AdapterIntegrityError` naming the tensor. The checks run identically on every rank (the
statistics of distributed tensors are all-reduced), so all ranks raise together and no collective is left waiting.
"""

from __future__ import annotations

import math

import torch

#: Relative tolerance between a saved tensor's sum of squares and the ranks' (same values, other summation order).
NORM_RTOL = 1e-4


class AdapterIntegrityError(ValueError):
    """An adapter tensor about to be saved is mis-shaped, not finite, or not what the model holds."""


def tensor_stats(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """key -> (number of non-finite elements, sum of squares) of each full logical tensor.

    `DTensor`s count over all ranks (one all-reduce per mesh, a collective every rank of it joins); plain tensors
    count as they are.
    """
    out: dict[str, tuple[float, float]] = {}
    by_mesh: dict[int, tuple[object, list[str], list[torch.Tensor]]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        if hasattr(tensor, "to_local"):
            mesh = tensor.device_mesh
            by_mesh.setdefault(id(mesh), (mesh, [], []))
            by_mesh[id(mesh)][1].append(key)
            by_mesh[id(mesh)][2].append(_local_stats(tensor.to_local()))
        elif tensor.is_floating_point() and tensor.numel():
            plain[key] = tensor
        else:
            stats = _local_stats(tensor)
            out[key] = (float(stats[0]), float(stats[1]))
    # Plain float tensors (every save of one process): one multi-tensor norm for all of them. A finite norm means
    # every element is finite; only a tensor whose norm is not pays for counting its bad elements.
    norms = torch._foreach_norm(list(plain.values()), dtype=torch.float64) if plain else []
    for (key, tensor), norm in zip(plain.items(), norms):
        sq = float(norm) ** 2
        out[key] = (0.0, sq) if math.isfinite(sq) else tuple(_local_stats(tensor).tolist())
    for mesh, keys, stats in by_mesh.values():
        import torch.distributed as dist

        flat = torch.stack(stats)
        for dim in range(mesh.ndim):  # Replicate dims count each value more than once: only Shard dims add up
            if all(tensors[k].placements[dim].is_shard() for k in keys):
                dist.all_reduce(flat, group=mesh.get_group(dim))
        for key, row in zip(keys, flat.tolist()):
            out[key] = (row[0], row[1])
    return out


def nonfinite_counts(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """key -> (number of non-finite elements, NaN) of plain tensors: the finiteness half of `tensor_stats`, cheaper.

    One multi-tensor norm per dtype in the tensors' own precision (float32 for half types; about twice as fast as
    the float64 sums of squares on CPU): a NaN or inf element makes the norm non-finite, so a finite norm proves
    every element finite. Only a tensor whose norm is not finite (a bad element, or a float32 overflow of a huge
    but finite tensor) is counted exactly. The sum of squares is not computed (NaN in its place).
    """
    out: dict[str, tuple[float, float]] = {}
    groups: dict[torch.dtype, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            groups.setdefault(tensor.dtype, {})[key] = tensor.detach()
        else:  # integers and bools are always finite
            out[key] = (0.0, math.nan)
    for dtype, group in groups.items():
        wide = None if dtype in (torch.float32, torch.float64) else torch.float32
        for (key, tensor), norm in zip(group.items(), torch._foreach_norm(list(group.values()), dtype=wide)):
            out[key] = (0.0, math.nan) if math.isfinite(norm) else (float(_local_stats(tensor)[0]), math.nan)
    return out


def _local_stats(local: torch.Tensor) -> torch.Tensor:
    if local.numel() == 0:
        return torch.zeros(2, dtype=torch.float64, device=local.device)
    # One reduction in the common case: a finite float64 sum of squares means every element is finite (squares of
    # float32/16 values cannot overflow float64); only a tensor that fails it pays for counting its bad elements.
    if local.is_floating_point():
        sq = torch.linalg.vector_norm(local, dtype=torch.float64).square()
    else:
        sq = local.to(torch.float64).square().sum()
    if bool(torch.isfinite(sq)):
        return torch.stack([sq.new_zeros(()), sq])
    values = local.to(torch.float64)
    finite = torch.isfinite(values)
    bad = (~finite).sum().to(torch.float64)
    sq = torch.where(finite, values, 0.0).pow(2).sum()
    return torch.stack([bad, sq])


def verify_full_state(
    adapter: str, state: dict[str, torch.Tensor], live: dict[str, tuple[tuple[int, ...], torch.Tensor]]
) -> None:
    """Check the full tensors `state` (PEFT key -> tensor) about to leave the store for adapter `adapter`.

    Args:
        live: PEFT key -> (logical shape, the tensor as this rank holds it): the reference each saved tensor
            must agree with. A plain tensor that is `state`'s own is not compared with itself.

    Raises:
        AdapterIntegrityError: naming each tensor at fault.
    """
    problems = [f"{key}: missing from the saved state" for key in live if key not in state]
    checked = {k: v for k, v in state.items() if k in live}
    problems += _shape_problems(checked, {k: s for k, (s, _) in live.items()})
    # Compared: DTensors (summed over ranks) and full-shaped tensors; a bare partition of an engine that keeps its
    # layout elsewhere (e.g. a ZeRO-3 placeholder) says nothing about the full value and is not compared. A saved
    # tensor that is the live tensor itself (one process) cannot disagree with it: it only needs to be finite.
    compare = {
        k: t
        for k, (shape, t) in live.items()
        if k in state and not _same_storage(t, state[k]) and (hasattr(t, "to_local") or tuple(t.shape) == shape)
    }
    stats = tensor_stats({k: v for k, v in checked.items() if k in compare or hasattr(v, "to_local")})
    stats.update(nonfinite_counts({k: v for k, v in checked.items() if k not in stats}))
    saved = {k: stats[k] for k in checked}
    held = tensor_stats(compare)
    for key, (bad, sq) in saved.items():
        if bad:
            problems.append(f"{key}: {int(bad)} non-finite value(s) (NaN/inf)")
        elif key in held and not held[key][0]:
            problems += _agreement(key, sq, held[key][1])
    _raise(problems, f"adapter {adapter!r}")


def verify_sharded_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Check the tensors of a distributed checkpoint (shards stay where they are) and return their sums of squares.

    Args:
        state: checkpoint key -> tensor (`DTensor`s for sharded tensors); only keys in `shapes` are checked.
        shapes: checkpoint key -> logical shape the store's specs declare.

    Returns:
        checkpoint key -> sum of squares of the full tensor, for the manifest (a later read must match it).
    """
    checked = {k: v for k, v in state.items() if k in shapes}
    problems = [f"{key}: missing from the checkpoint state" for key in shapes if key not in state]
    problems += _shape_problems(checked, shapes)
    stats = tensor_stats(checked)
    problems += [f"{key}: {int(bad)} non-finite value(s) (NaN/inf)" for key, (bad, _) in stats.items() if bad]
    _raise(problems, "checkpoint")
    return {key: sq for key, (_, sq) in stats.items()}


def verify_read_back(where: str, tensors: dict[str, torch.Tensor], expected: dict[str, dict]) -> None:
    """Check full tensors read back from a checkpoint against its manifest (``shape``, and ``sq_norm`` if recorded).

    Raises:
        AdapterIntegrityError: naming each tensor at fault.
    """
    problems = _shape_problems(tensors, {k: tuple(info["shape"]) for k, info in expected.items()})
    for key, (bad, sq) in tensor_stats(tensors).items():
        if bad:
            problems.append(f"{key}: {int(bad)} non-finite value(s) (NaN/inf)")
        elif expected.get(key, {}).get("sq_norm") is not None:
            problems += _agreement(key, sq, float(expected[key]["sq_norm"]), held_by="the checkpoint's manifest")
    _raise(problems, where, verb="use")


def _shape_problems(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return [
        f"{key}: shape {tuple(t.shape)}, but its adapter config implies {tuple(shapes[key])}"
        for key, t in tensors.items()
        if key in shapes and tuple(t.shape) != tuple(shapes[key])
    ]


def _agreement(key: str, saved: float, held: float, held_by: str = "the model") -> list[str]:
    if held > 0 and saved == 0:
        return [f"{key}: all zeros, but {held_by} holds nonzero values (sum of squares {held:.6g}): a lost gather"]
    if not math.isclose(saved, held, rel_tol=NORM_RTOL, abs_tol=1e-30):
        return [f"{key}: sum of squares {saved:.6g} differs from {held:.6g}, what {held_by} holds"]
    return []


def _same_storage(live: torch.Tensor, saved: torch.Tensor) -> bool:
    return not hasattr(live, "to_local") and live.shape == saved.shape and live.data_ptr() == saved.data_ptr()


_ADVICE = {
    "save": "Nothing was written. A tensor that disagrees with the model usually means it was read outside the "
    "backend's gather (e.g. a raw `.data` of a sharded parameter); save through save_pretrained / save_checkpoint "
    "on every rank.",
    "use": "Nothing was loaded or exported: the checkpoint's files do not hold what was saved (a damaged or "
    "partly overwritten checkpoint); use another step directory.",
}


def _raise(problems: list[str], what: str, verb: str = "save") -> None:
    if problems:
        more = f" ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise AdapterIntegrityError(
            f"refusing to {verb} {what}: " + "; ".join(problems[:8]) + more + ". " + _ADVICE[verb]
        )
