"""Run a function on W gloo CPU ranks (spawned processes) and collect what each rank returns.

`fn` must be importable by the children (a module-level function of a test module or of this file); it runs with
the default process group initialised through `dpeft.dist.init_distributed("cpu")`.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Ranks share two cores with everything else: one thread each keeps them from fighting.
    import torch

    torch.set_num_threads(1)
    from dpeft.dist import destroy_distributed, init_distributed

    try:
        init_distributed("cpu", timeout_s=120)
        # Plain pickle bytes: a tensor sent through a torch queue lives in shared memory that vanishes when
        # this process exits, before the parent may have read it.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank named
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_distributed(fn, world_size: int, *args, timeout: float = 120) -> list:
    """Run ``fn(*args)`` on `world_size` spawned gloo ranks; returns the results in rank order.

    Raises:
        RuntimeError: with the traceback of the first rank that failed, or on timeout.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty as exc:
                raise RuntimeError(f"distributed run timed out after {timeout}s; ranks done: {sorted(out)}") from exc
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
