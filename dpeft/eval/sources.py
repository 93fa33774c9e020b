"""Which adapters to evaluate: PEFT-format folders and dpeft distributed checkpoints, named and listed up front.

The driver expands what the user passed (paths, a name -> path mapping, glob patterns) into `AdapterRef`s before
any evaluation starts. A path that is neither kind becomes a ref that carries its error, so it shows up as a
failed row of the results table instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class AdapterRef:
    """One adapter to evaluate.

    Attributes:
        name: Its row name in the results table (unique).
        path: A PEFT-format folder, or a checkpoint step directory when `checkpoint_adapter` is set.
        checkpoint_adapter: For a distributed checkpoint, the name of the adapter inside it.
        error: Set when the path could not be resolved; the ref is then reported, not evaluated.
    """

    name: str
    path: str
    checkpoint_adapter: str | None = None
    error: str | None = None


def _checkpoint_adapters(path: str) -> tuple[str, list[str]]:
    """(step directory, adapter names) of a checkpoint step directory or root; raises ValueError if neither."""
    from dpeft.checkpoint.dcp import resolve_checkpoint
    from dpeft.checkpoint.dcp_manifest import read_manifest

    step = resolve_checkpoint(path)
    return step, list(read_manifest(step)["adapters"])


def _is_checkpoint(path: str) -> bool:
    from dpeft.checkpoint.dcp_manifest import MANIFEST

    if os.path.isfile(os.path.join(path, MANIFEST)):
        return True
    return any(e.startswith("step-") and os.path.isdir(os.path.join(path, e)) for e in os.listdir(path))


def _refs_for(name: str, path: str) -> list[AdapterRef]:
    if not os.path.isdir(path):
        return [AdapterRef(name, path, error=f"{path!r} is not a directory")]
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return [AdapterRef(name, path)]
    if not _is_checkpoint(path):
        return [
            AdapterRef(
                name,
                path,
                error=f"{path!r} is neither a PEFT-format adapter folder (no {CONFIG_NAME}) nor a dpeft checkpoint "
                "(a step-XXXXXXXX directory or a root holding them)",
            )
        ]
    try:
        step, adapters = _checkpoint_adapters(path)
    except ValueError as exc:
        return [AdapterRef(name, path, error=str(exc))]
    if adapters == ["default"]:
        return [AdapterRef(name, step, checkpoint_adapter="default")]
    return [AdapterRef(f"{name}[{a}]", step, checkpoint_adapter=a) for a in adapters]


def expand_adapters(
    adapters: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
    patterns: Sequence[str] = (),
) -> list[AdapterRef]:
    """The adapters to evaluate, in the order given.

    Args:
        adapters: Paths (each row is named by its path as given) or a mapping row name -> path. A path is a
            PEFT-format folder, a checkpoint step directory, or a checkpoint root (its newest complete step);
            a checkpoint holding several adapters gives one row per adapter, named ``name[adapter]``.
        patterns: Glob patterns (``runs/*/adapter``) whose matching directories are added, sorted.

    Raises:
        ValueError: if nothing is given, or two rows would have the same name.
    """
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    items = (
        [(str(k), os.fspath(v)) for k, v in adapters.items()]
        if isinstance(adapters, Mapping)
        else [(os.fspath(p), os.fspath(p)) for p in adapters or []]
    )
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
        if not matches:
            raise ValueError(f"adapter glob {pattern!r} matches no directory")
        items.extend((p, p) for p in matches)
    if not items:
        raise ValueError("no adapters to evaluate: pass adapter paths or a glob pattern")
    refs = [ref for name, path in items for ref in _refs_for(name, path)]
    seen: set[str] = set()
    duplicates = sorted({r.name for r in refs if r.name in seen or seen.add(r.name)})
    if duplicates:
        raise ValueError(f"adapters {duplicates} are listed more than once; give each row one name")
    return refs


@contextlib.contextmanager
def peft_folder(ref: AdapterRef) -> Iterator[str]:
    """A PEFT-format folder holding `ref`'s adapter: its own folder, or a temporary export of a checkpoint."""
    if ref.checkpoint_adapter is None:
        yield ref.path
        return
    from dpeft.checkpoint.export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="dpeft-eval-") as tmp:
        export_checkpoint(ref.path, tmp)
        yield tmp if ref.checkpoint_adapter == "default" else os.path.join(tmp, ref.checkpoint_adapter)
