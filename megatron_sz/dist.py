"""Start and describe torch.distributed worlds, on GPU (NCCL) or CPU (gloo).

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` fresh processes with a process group already initialised, and returns
the list of per-rank return values. It is how tests and ``megatron-sz convert check``
get TP=2 / PP=2 on one CPU machine; under torchrun or srun the group comes from the
environment instead (``init_from_env``).

Workers must be importable top-level functions (spawn pickles them by reference).
"""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun/SLURM variables.

    Under ``srun`` without torchrun, RANK/WORLD_SIZE/LOCAL_RANK are derived from
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. A single process with no variables gets a
    world of one, so every job also runs as plain ``python``.
    """
    import torch
    import torch.distributed as tdist

    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    backend = backend or default_backend()
    timeout = timedelta(seconds=timeout_s)
    if env.get("WORLD_SIZE", "1") == "1" and "MASTER_PORT" not in env:
        # A plain single process (no torchrun/srun): a private rendezvous on a fresh port,
        # written nowhere in os.environ, so child processes (trainer subprocesses of the
        # local executor, tests) never inherit a port this process's store still holds.
        if backend == "nccl":
            torch.cuda.set_device(0)
        tdist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                 rank=0, world_size=1, timeout=timeout)
        return 0, 1
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        raise RuntimeError("MASTER_PORT is not set for a multi-process job; launch with torchrun "
                           "or export MASTER_ADDR/MASTER_PORT in the sbatch script")
    if backend == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    tdist.init_process_group(backend=backend, timeout=timeout)
    return tdist.get_rank(), tdist.get_world_size()


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
            results: Any) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        init_from_env(backend)
        out = fn(rank, world_size, *args)
        results[rank] = ("ok", out)
    except BaseException as exc:  # report to the parent instead of hanging it
        results[rank] = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any, backend: str | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes; return results."""
    import torch.multiprocessing as mp

    backend = backend or default_backend()
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    try:
        mp.start_processes(_worker, args=(world_size, free_port(), backend, fn, args, results),
                           nprocs=world_size, join=True, start_method="spawn")
    except Exception as exc:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        raise RuntimeError("distributed worker failed:\n" + ("\n".join(errors) or str(exc))) from None
    out = [results[r][1] for r in range(world_size)]
    manager.shutdown()
    return out
