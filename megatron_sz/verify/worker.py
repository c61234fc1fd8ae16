"""A persistent, killable subprocess for the symbolic checks (our own code only).

This is the one killable worker for trusted code that may hang in C. Code we did not
write (seed snippets, model programs, tool calls) never comes here: it runs in
``megatron_sz/sandbox/``.

Why a subprocess: a per-answer timeout has to stop sympy even when it is stuck in C
(big-integer arithmetic, ``simplify``). Signals only reach the main thread and only
between bytecodes, so a thread or ``signal.alarm`` cannot promise that. A child process
can always be killed. The child imports sympy + math-verify once (about a second) and
then answers JSON-line requests; on a timeout the parent kills it and starts a fresh one
in the background, so the next request rarely waits for the import.

The child caps its own address space (``RLIMIT_AS``), so ``expand((x+1)**9999)``-style
blow-ups end in a ``MemoryError`` reply rather than in swapping the machine.

Protocol (one JSON object per line): the child prints ``{"ready": true}`` once, then for
each request ``{"id", "a", "b", flags..., "timeout_s"}`` replies ``{"id", "eq", "how"}``.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

__all__ = ["Worker", "default_worker", "shutdown_all"]

WORKER_MEMORY_BYTES = 3 << 30
_ALL_WORKERS: "weakref.WeakSet[Worker]" = weakref.WeakSet()


class Worker:
    """One killable verifier subprocess. Not thread-safe by itself; callers hold ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buf = b""
        self._next_id = 0
        self.restarts = 0
        self.ever_ready = False  # the first import is not charged to any answer's timeout
        self.last_failure = ""  # "timeout" | "crashed" after a call returned None
        self._owner_pid = os.getpid()
        _ALL_WORKERS.add(self)

    def _check_fork(self) -> None:
        # After os.fork the pipes belong to the parent's child process: forget, never reuse.
        if self._owner_pid != os.getpid():
            self._proc, self._ready, self._buf = None, False, b""
            self._owner_pid = os.getpid()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the child if none is running (returns at once; the import runs in the child)."""
        self._check_fork()
        if self._proc is not None and self._proc.poll() is None:
            return
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "megatron_sz.verify.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, close_fds=True)
        self._ready = False
        self._buf = b""

    def kill(self) -> None:
        self._check_fork()
        proc, self._proc = self._proc, None
        self._ready = False
        self._buf = b""
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 -- already gone
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass

    def wait_ready(self, deadline: float) -> bool:
        self.start()
        if self._ready:
            return True
        line = self._readline(deadline)
        if line is None:
            return False
        try:
            self._ready = bool(json.loads(line).get("ready"))
        except ValueError:
            self._ready = False
        if not self._ready:
            self.kill()
        self.ever_ready = self.ever_ready or self._ready
        return self._ready

    # ------------------------------------------------------------ requests
    def call(self, request: dict, deadline: float) -> dict | None:
        """Send one request; the reply, or None on timeout/crash (the child is then replaced)."""
        if not self.wait_ready(deadline):
            self.last_failure = "timeout"
            if self._proc is None or self._proc.poll() is not None:
                self.last_failure = "crashed"
                self.kill()  # died while starting; next call starts a fresh one
            return None
        self._next_id += 1
        req = dict(request, id=self._next_id)
        try:
            self._proc.stdin.write((json.dumps(req) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.last_failure = "crashed"
            self._restart()
            return None
        while True:
            line = self._readline(deadline)
            if line is None:
                self.last_failure = "crashed" if self._proc.poll() is not None else "timeout"
                self._restart()
                return None
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if reply.get("id") == self._next_id:
                return reply

    def _restart(self) -> None:
        self.kill()
        self.restarts += 1
        try:
            self.start()  # import the next child in the background, while the caller moves on
        except OSError:
            pass

    def _readline(self, deadline: float) -> bytes | None:
        proc = self._proc
        if proc is None:
            return None
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # child died
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


_DEFAULT: Worker | None = None
_DEFAULT_LOCK = threading.Lock()


def default_worker() -> Worker:
    """The process-wide worker used by ``is_equivalent`` (started on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Worker()
        return _DEFAULT


def shutdown_all() -> None:
    for w in list(_ALL_WORKERS):
        if w._owner_pid == os.getpid():
            w.kill()


def _after_fork_in_child() -> None:
    global _DEFAULT, _DEFAULT_LOCK
    _DEFAULT = None  # the parent's worker (and a lock that may be held) stay with the parent
    _DEFAULT_LOCK = threading.Lock()


atexit.register(shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- the child
def _child_main() -> None:
    # Our protocol owns the real stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    import logging
    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure
    from megatron_sz.verify.symbolic import symbolic_equal
    import math_verify  # noqa: F401 -- pay the import before saying ready
    import sympy  # noqa: F401
    selftest = os.environ.get("MEGATRON_SZ_VERIFY_SELFTEST") == "1"
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        if selftest and req.get("selftest_hang"):
            # One C-level big-integer power (~minutes): no signal or thread can stop it,
            # only the parent's kill. Used by tests/test_verify.py to prove the timeout.
            _ = 3 ** (10 ** 8)
        try:
            eq, how = symbolic_equal(
                req["a"], req["b"], a_percent=req.get("a_percent", False),
                b_percent=req.get("b_percent", False), a_degrees=req.get("a_degrees", False),
                b_degrees=req.get("b_degrees", False), timeout_s=float(req.get("timeout_s", 5.0)))
        except BaseException as err:  # noqa: BLE001 -- MemoryError, RecursionError, timeouts
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            eq, how = None, f"symbolic error: {type(err).__name__}"
        proto.write(json.dumps({"id": req.get("id"), "eq": eq, "how": how}) + "\n")


if __name__ == "__main__":
    _child_main()
