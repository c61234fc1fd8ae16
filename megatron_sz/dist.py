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
import sys
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


def _watch_parent(conn) -> None:
    """Exit this process as soon as the parent is gone (killed with SIGKILL included).

    Two mechanisms, because either alone has a gap: Linux's PR_SET_PDEATHSIG delivers
    SIGKILL when the parent thread dies; the pipe works everywhere: the parent holds
    the only write end, so a blocking read returns EOF the moment the parent exits."""
    import signal
    import threading

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def wait_for_eof() -> None:
        try:
            conn.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)  # the parent is gone (or sent a word: it never does): stop now

    threading.Thread(target=wait_for_eof, name="msz-parent-watch", daemon=True).start()


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
            result_path: str, parent_conn: Any, parent_pid: int) -> None:
    import pickle

    _watch_parent(parent_conn)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    from megatron_sz import quiet

    quiet.install()  # a spawned rank runs no CLI main: same warning filters as its parent
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    code = 0
    try:
        init_from_env(backend)
        record = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # report to the parent instead of hanging it
        from megatron_sz.errors import UserError

        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        record = ("error", exc if isinstance(exc, UserError) else None, text)
        code = 1
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    tmp = f"{result_path}.tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(record, f)
    except Exception as exc:  # an unpicklable return value
        with open(tmp, "wb") as f:
            pickle.dump(("error", None, f"rank {rank}: cannot send the result back: {exc}"), f)
        code = 1
    os.replace(tmp, result_path)
    _reap_children()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _reap_children() -> None:
    """Stop what libraries started inside this rank before ``os._exit`` skips their
    finalizers. Megatron's async checkpoint writer keeps a module-level
    ``multiprocessing.Manager`` (a server process, ~270 MB) for its results queue; without
    this every spawned rank that saved a checkpoint left one behind, re-parented to PID 1
    forever (57 of them, 15 GiB, after one run of the test suite). Runs the finalizers a
    normal interpreter exit would (manager shutdown included), then ends any child left."""
    import multiprocessing as mp
    from multiprocessing import util

    try:
        util._run_finalizers(0)  # exitpriority >= 0: manager shutdowns, as at a normal exit
    except Exception:  # noqa: BLE001 - best effort: the rank's result is already written
        pass
    kids = mp.active_children()
    for p in kids:
        p.terminate()
    for p in kids:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()


def spawn(fn: Callable, world_size: int, *args: Any, backend: str | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes; return results.

    No ``multiprocessing.Manager`` (its server process outlived a SIGKILLed parent, about
    220 MB each, issue 20): results come back as pickle files in a temporary folder, and
    every worker exits when the parent dies (death signal + a pipe it watches). When one
    rank fails, the others are terminated; a ``UserError`` raised in a rank is re-raised
    here as is, anything else as a ``RuntimeError`` carrying the rank's traceback."""
    import multiprocessing as mp
    import pickle
    import tempfile
    from multiprocessing.connection import wait

    backend = backend or default_backend()
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="msz-spawn-") as tmp:
        procs, writers, failed = [], [], None
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                path = os.path.join(tmp, f"rank{rank}.pkl")
                p = ctx.Process(target=_worker, name=f"msz-rank{rank}",
                                args=(rank, world_size, port, backend, fn, args, path, reader, os.getpid()))
                p.start()
                reader.close()  # the child holds the only read end; ours would hide the EOF
                procs.append(p)
                writers.append(writer)
            pending = {p.sentinel: p for p in procs}
            while pending and failed is None:
                for sentinel in wait(list(pending)):
                    p = pending.pop(sentinel)
                    p.join()
                    if p.exitcode != 0:
                        failed = p
        finally:
            for p in procs:  # a failed rank or an interrupt here: stop the others, leave none behind
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
            for w in writers:
                w.close()
        records = []
        for rank in range(world_size):
            path = os.path.join(tmp, f"rank{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    records.append(pickle.load(f))
            else:
                records.append(("error", None, f"rank {rank} exited with code {procs[rank].exitcode} "
                                               "and no result"))
    errors = [(rank, r) for rank, r in enumerate(records) if r[0] == "error"]
    for _, r in errors:
        if r[1] is not None:
            raise r[1]
    if errors:
        # The rank that failed first explains it; the others were terminated because of it.
        first = [r for rank, r in errors if procs[rank] is failed] or [r for _, r in errors]
        raise RuntimeError("distributed worker failed:\n" + "\n".join(r[2] for r in first))
    return [r[1] for r in records]
