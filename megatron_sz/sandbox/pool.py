"""Host side of the sandbox: the bubblewrap command line, workers, the pool, tiers.

What is unusual here:

* **Every bubblewrap is started from one long-lived spawner thread.** ``--die-with-parent``
  is a parent-death signal, which Linux ties to the *thread* that forked, not the process:
  a bwrap started from a short-lived thread would be killed when that thread ends.
* **When we are root we start bwrap as uid 65534** (``nobody``), so that inside the sandbox
  nothing maps to host root and ``RLIMIT_NPROC`` is enforced (root is exempt from it).
  bwrap resolves bind sources with its caller's permissions and ``nobody`` cannot enter
  e.g. ``/root/.pyenv``, so the forked child first (still root) enters a private mount
  namespace and bind-mounts those sources onto placeholders that ``nobody`` can reach
  (``_stage_for_nobody``); the host's mount table never changes. The fork server closes
  every inherited descriptor before it runs anything else.
* **A worker is one bwrap whose PID 1 is the fork server** (``_server.py``). Each execution
  is a fresh forked child. On a wall-clock timeout we kill the outer bwrap, which takes
  the whole namespace with it, and start a new worker in the background.
* Tiers: ``bwrap`` (namespaces + seccomp + rlimits) and, where user namespaces are
  unavailable, ``process`` (the same server as a plain child process: seccomp that also
  forbids fork and signals to others, rlimits, uid 65534 when root, a private tmp dir).
"""
from __future__ import annotations

import atexit
import json
import os
import platform
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sz.errors import UserError
from megatron_sz.sandbox import seccomp
from megatron_sz.sandbox.result import MIB, Result, Task

_HDR = struct.Struct("<Q")
_SERVER_SOURCE = (Path(__file__).parent / "_server.py").read_text(encoding="utf-8")
TIERS = ("bwrap", "process")
TIER_ENV = "MEGATRON_SZ_SANDBOX_TIER"
NOBODY = 65534
#: Frame bytes allowed beyond the output caps (JSON escaping can grow text 6x).
_FRAME_SLACK = 64 * 1024


# --------------------------------------------------------------------------- layout

def _bwrap_path() -> str | None:
    return shutil.which("bwrap") or ("/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap")
                                     else None)


def _dedupe(paths: list[str]) -> list[str]:
    """Drop missing paths and paths inside another one; keep order stable."""
    real = []
    for p in paths:
        if p and os.path.exists(p):
            rp = os.path.realpath(p)
            if rp not in real:
                real.append(rp)
    real.sort(key=len)
    keep: list[str] = []
    for p in real:
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in keep):
            keep.append(p)
    return keep


def interpreter_paths(site_packages: bool) -> tuple[list[str], list[str]]:
    """(read-only binds, sys.path additions) for running this interpreter in the sandbox.

    The interpreter binary, its stdlib folder (with lib-dynload), libpython, the system
    library folders and, with ``site_packages``, the folders pip installs into. Never a home
    directory or the checkout as such: only the interpreter's own folders inside them.
    """
    exe = os.path.realpath(sys.executable)
    binds = [exe, sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    for name in {sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")}:
        if name and libdir and name.endswith((".so", ".so.1.0")) or (name and ".so." in name):
            binds.append(os.path.join(libdir, name))
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    binds += [f"/usr/lib/{multiarch}", "/usr/lib64", f"/lib/{multiarch}"]
    extra: list[str] = []
    if site_packages:
        import site

        extra = _dedupe([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
                        + list(site.getsitepackages()))
        binds += extra
    return _dedupe(binds), extra


@dataclass
class Config:
    """How a pool's workers are built. Fields are validated in ``__post_init__``."""

    workers: int = 0  #: 0 = one per CPU core (at most 8)
    preload: tuple[str, ...] = ()  #: modules imported once in the server (e.g. "sympy")
    #: trusted code the server runs once after ``preload`` (warm lazy caches); never task code
    warmup: str = ""
    site_packages: bool = False  #: bind pip's folders read-only so installed packages import
    tier: str = "auto"  #: auto | bwrap | process (env MEGATRON_SZ_SANDBOX_TIER overrides auto)
    tmp_size: int = 64 * MIB  #: tmpfs size of /tmp
    shm_size: int = 16 * MIB  #: tmpfs size of /dev/shm
    nproc: int = 64  #: processes + threads per execution (bwrap tier)
    start_timeout: float = 120.0  #: seconds a worker may take to start (preload imports)

    def __post_init__(self) -> None:
        self.preload = tuple(self.preload)
        if self.tier == "auto":
            self.tier = os.environ.get(TIER_ENV, "auto") or "auto"
        if self.tier not in ("auto",) + TIERS:
            raise UserError(f"unknown sandbox tier {self.tier!r}", where=TIER_ENV,
                            fix=f"use one of auto, {', '.join(TIERS)}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise UserError(f"workers must be an int >= 0, got {self.workers!r}",
                            where="Sandbox(workers=...)", fix="pass 0 for one per core")
        if self.workers == 0:
            self.workers = max(1, min(8, len(os.sched_getaffinity(0))))
        for mod in self.preload:
            if not all(part.isidentifier() for part in mod.split(".")):
                raise UserError(f"preload entry {mod!r} is not a module name",
                                where="Sandbox(preload=...)", fix="pass e.g. ('sympy',)")


def bwrap_argv(cfg: Config, binds: list[tuple[str, str]], seccomp_fd: int) -> list[str]:
    """The bubblewrap command line; ``binds`` are (host source, sandbox path) pairs."""
    argv = [_bwrap_path() or "bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--as-pid-1",
            "--new-session", "--cap-drop", "ALL", "--disable-userns", "--hostname", "sandbox",
            "--clearenv", "--setenv", "PYTHONHASHSEED", "0", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "TMPDIR", "/tmp"]
    made = set()
    for src, dest in binds:
        parent = os.path.dirname(dest)
        chain = []
        while parent not in ("/", "") and parent not in made:
            chain.append(parent)
            made.add(parent)
            parent = os.path.dirname(parent)
        for d in reversed(chain):
            argv += ["--dir", d]
        argv += ["--ro-bind", src, dest]
    for link, target in (("/lib", "usr/lib"), ("/lib64", "usr/lib64")):
        if link not in made and not any(dest == link or dest.startswith(link + "/")
                                        for _, dest in binds):
            argv += ["--symlink", target, link]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(cfg.tmp_size), "--tmpfs", "/tmp",
             "--size", str(cfg.shm_size), "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
             "--seccomp", str(seccomp_fd), "--"]
    return argv


def python_argv() -> list[str]:
    flags = ["-s", "-S", "-B"] + (["-P"] if sys.version_info >= (3, 11) else [])
    return [os.path.realpath(sys.executable), *flags, "-c", _SERVER_SOURCE]


# --------------------------------------------------------------------------- spawner

class _Spawner:
    """One long-lived thread that starts every worker process (see the module docstring)."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="sandbox-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, fut = self._q.get()
            if fn is None:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def call(self, fn):
        fut: Future = Future()
        self._q.put((fn, fut))
        return fut.result()

    def stop(self) -> None:
        self._q.put((None, None))


_SPAWNER: _Spawner | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawner() -> _Spawner:
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or not _SPAWNER._thread.is_alive():
            _SPAWNER = _Spawner()
        return _SPAWNER


# --------------------------------------------------------------------------- worker

class WorkerStartError(RuntimeError):
    """A worker did not come up (the message says what its start-up printed)."""


def _frame(obj: dict) -> bytes:
    data = json.dumps(obj).encode("utf-8")
    return _HDR.pack(len(data)) + data


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def _nobody_can_reach(path: str) -> bool:
    """Can uid/gid 65534 (no other groups) read ``path``? (mode bits of every parent)"""
    def other(st, bit: int) -> bool:
        if st.st_uid == NOBODY:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid == NOBODY:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    parts = Path(path).parts
    for i in range(1, len(parts)):
        if not other(os.stat(os.path.join(*parts[:i])), 1):
            return False
    st = os.stat(path)
    return other(st, 4) and (not os.path.isdir(path) or other(st, 1))


_libc = None


def _first_unreachable(path: str) -> str | None:
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        sub = os.path.join(*parts[:i])
        st = os.stat(sub)
        if os.path.isdir(sub) and not (st.st_mode & 0o001):
            return sub
    return None


def _cover_for_nobody(binds: list[str]):
    """Fallback tier as root: a ``preexec_fn`` that lets nobody run this interpreter.

    In a private mount namespace (root may create one without user namespaces), every
    folder that nobody cannot enter on the way to a bind (e.g. ``/root``) is covered by an
    empty tmpfs holding only the interpreter's own folders, bound back in. So the server
    starts as nobody, and the home directory it covers is not visible to it at all.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    need = [(p, _first_unreachable(p)) for p in binds]
    need = [(p, top) for p, top in need if top]
    if not need:
        return _drop_to_nobody
    tops = sorted({top for _, top in need})

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(ctypes.get_errno(), what)

    def preexec() -> None:
        check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
        check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "mount(MS_PRIVATE)")
        fds = [(os.open(p, os.O_PATH), p) for p, _ in need]  # in the new namespace
        for top in tops:
            check(libc.mount(b"tmpfs", os.fsencode(top), b"tmpfs", 0,
                             b"mode=0755,size=1m"), "tmpfs over " + top)
        for fd, p in fds:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(p, 0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
                with open(p, "wb"):
                    pass
            check(libc.mount(os.fsencode(f"/proc/self/fd/{fd}"), os.fsencode(p), None,
                             0x1000 | 0x4000, None), "bind " + p)
            check(libc.mount(b"none", os.fsencode(p), None, 0x1000 | 0x20 | 0x1 | 0x4000,
                             None), "remount read-only " + p)  # BIND|REMOUNT|RDONLY|REC
            os.close(fd)
        _drop_to_nobody()

    return preexec


def _stage_for_nobody(pairs: list[tuple[str, str]], stage: str):
    """Binds for a bwrap started as nobody, and the ``preexec_fn`` that makes them work.

    bubblewrap resolves every bind source with the caller's permissions, and nobody cannot
    enter e.g. ``/root`` (pyenv). So the forked child, still root, enters a private mount
    namespace, bind-mounts each unreachable source onto an empty placeholder in ``stage``
    (a 0755 folder of ours), then drops to nobody and execs bwrap, which binds from there.
    The host's mount table never changes.
    """
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    out, staged = [], []
    for i, (src, dest) in enumerate(pairs):
        if _nobody_can_reach(src):
            out.append((src, dest))
            continue
        ph = os.path.join(stage, str(i))
        if not os.path.exists(ph):
            if os.path.isdir(src):
                os.mkdir(ph, 0o755)
            else:
                with open(ph, "wb"):
                    pass
                os.chmod(ph, 0o644)
        staged.append((os.fsencode(src), os.fsencode(ph)))
        out.append((ph, dest))
    libc = _libc

    def preexec() -> None:
        ms_rec, ms_private, ms_bind = 0x4000, 0x40000, 0x1000
        if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:
            raise OSError(ctypes.get_errno(), "mount(MS_PRIVATE)")
        for src, ph in staged:
            if libc.mount(src, ph, None, ms_bind, None) != 0:
                raise OSError(ctypes.get_errno(), "bind mount of " + os.fsdecode(src))
        _drop_to_nobody()

    return out, (preexec if staged else _drop_to_nobody)


def _child_pids(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out = []
    for t in tasks:
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


_STAGE: str | None = None
_STAGE_LOCK = threading.Lock()


class Worker:
    """One fork server (in a bwrap, or a plain process in the fallback tier)."""

    def __init__(self, cfg: Config, tier: str) -> None:
        self.cfg, self.tier = cfg, tier
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.executions = 0
        self.restarts = -1
        self._tmpdir: str | None = None
        self._status_buf = b""

    def _stage_dir(self) -> str:
        global _STAGE
        with _STAGE_LOCK:
            if _STAGE is None or not os.path.isdir(_STAGE):
                _STAGE = tempfile.mkdtemp(prefix="megatron-sz-stage-")
                os.chmod(_STAGE, 0o755)
                atexit.register(shutil.rmtree, _STAGE, True)
            return _STAGE

    # ---- lifecycle
    def start(self) -> None:
        """Start the process (returns at once; ``wait_ready`` waits for the server)."""
        self.kill()
        self.restarts += 1
        self.proc, self._req_w, self._res_r, self._st_r = _spawner().call(self._spawn)
        self.ready = False
        self._status_buf = b""

    def _spawn(self):
        binds, sys_path = interpreter_paths(self.cfg.site_packages)
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        st_r, st_w = os.pipe()
        close_after = [req_r, res_w, st_w]
        cfg = {"tier": self.tier, "preload": list(self.cfg.preload), "sys_path": sys_path,
               "warmup": self.cfg.warmup,
               "server_filter": seccomp.build_filter("server").hex(), "nproc": 0, "env": {}}
        preexec = None
        try:
            if self.tier == "bwrap":
                pairs = [(p, p) for p in binds]
                if os.geteuid() == 0:
                    pairs, preexec = _stage_for_nobody(pairs, self._stage_dir())
                sc_r, sc_w = os.pipe()
                os.write(sc_w, seccomp.build_filter("base"))
                os.close(sc_w)
                close_after.append(sc_r)
                argv = bwrap_argv(self.cfg, pairs, sc_r) + python_argv() + [str(st_w)]
                cfg.update(wipe=["/tmp", "/dev/shm"], nproc=self.cfg.nproc)
                pass_fds = [sc_r, st_w]
                env, cwd = {}, "/"
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="megatron-sz-sandbox-")
                if os.geteuid() == 0:
                    os.chown(self._tmpdir, NOBODY, NOBODY)
                env = {"PYTHONHASHSEED": "0", "HOME": self._tmpdir, "TMPDIR": self._tmpdir,
                       "LANG": "C.UTF-8"}
                cfg.update(wipe=[self._tmpdir], env=env,
                           child_filter_template=seccomp.child_template())
                argv = python_argv() + [str(st_w)]
                pass_fds, cwd = [st_w], self._tmpdir
                if os.geteuid() == 0:
                    preexec = _cover_for_nobody(binds)
            proc = subprocess.Popen(argv, stdin=req_r, stdout=res_w, stderr=subprocess.PIPE,
                                    pass_fds=pass_fds, env=env, cwd=cwd, close_fds=True,
                                    start_new_session=True, preexec_fn=preexec)
        except BaseException:
            for fd in (req_w, res_r, st_r):
                os.close(fd)
            raise
        finally:
            for fd in close_after:
                os.close(fd)
        try:
            os.write(req_w, _frame(cfg))
        except OSError:
            pass  # died at once; wait_ready reports its stderr
        for fd in (req_w, res_r, st_r):
            os.set_blocking(fd, False)
        os.set_blocking(proc.stderr.fileno(), False)
        return proc, req_w, res_r, st_r

    def wait_ready(self) -> None:
        if self.ready:
            return
        if self.proc is None:
            self.start()
        deadline = time.monotonic() + self.cfg.start_timeout
        while True:
            frame = self._read_status(deadline)
            if frame is not None and frame.get("ready"):
                self.ready = True
                self.proc.stderr.close()
                return
            if frame is None:
                why = self._startup_error()
                self.kill()
                raise WorkerStartError(why)

    def _startup_error(self) -> str:
        err = b""
        if self.proc is not None:
            try:
                err = self.proc.stderr.read() or b""
            except (OSError, ValueError):
                err = b""
        text = err.decode("utf-8", "replace").strip().splitlines()
        code = self.proc.poll() if self.proc else None
        last = " | ".join(text[-3:]) if text else "no output"
        return f"sandbox worker ({self.tier}) did not start (exit code {code}): {last}"

    def kill(self) -> None:
        """SIGKILL the worker and wait until its whole PID namespace is gone.

        Killing the outer bwrap is not enough on its own: its PID-1 server gets its
        parent-death signal, but tearing down a namespace full of fork-bomb children takes
        the kernel a while on a busy machine, so we also kill the server directly and wait
        for it (the kernel reaps the namespace before PID 1 is gone).
        """
        proc, self.proc = self.proc, None
        self.ready = False
        if proc is not None:
            inner = _child_pids(proc.pid)
            for pid in [proc.pid] + inner:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
            deadline = time.monotonic() + 10.0
            while any(_alive(p) for p in inner) and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.stderr and not proc.stderr.closed:
                proc.stderr.close()
            for fd in (self._req_w, self._res_r, self._st_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._tmpdir and self.tier == "process":
            # our own child was the only writer; it is dead now
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ---- status channel
    def _read_status(self, deadline: float) -> dict | None:
        """Next status frame from the server, or None on EOF / deadline."""
        while True:
            if len(self._status_buf) >= _HDR.size:
                (n,) = _HDR.unpack_from(self._status_buf)
                if n > 1 << 16:
                    return None
                if len(self._status_buf) >= _HDR.size + n:
                    data = self._status_buf[_HDR.size:_HDR.size + n]
                    self._status_buf = self._status_buf[_HDR.size + n:]
                    try:
                        return json.loads(data)
                    except ValueError:
                        return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self._st_r], [], [], left)
            if not r:
                return None
            chunk = os.read(self._st_r, 65536)
            if not chunk:
                return None
            self._status_buf += chunk

    # ---- one execution
    def execute(self, task: Task) -> Result:
        self.wait_ready()
        req = _frame(task.request())
        cap = 2 * (task.output_limit + task.value_limit) * 6 + _FRAME_SLACK
        t0 = time.monotonic()
        deadline = t0 + task.timeout
        res_buf = bytearray()
        status = None
        while status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._give_up("timeout", f"ran past its {task.timeout:g} s wall-clock "
                                     "limit", t0)
            wl = [self._req_w] if req else []
            r, w, _ = select.select([self._res_r, self._st_r], wl, [], left)
            if w:
                try:
                    req = req[os.write(self._req_w, req):]
                except BlockingIOError:
                    pass
                except OSError:
                    return self._give_up("crashed", "the sandbox worker went away", t0)
            if self._res_r in r:
                chunk = self._drain(self._res_r, cap + 1 - len(res_buf))
                if chunk is None:
                    return self._give_up("crashed", "the sandbox worker went away", t0)
                res_buf += chunk
                if len(res_buf) > cap:
                    return self._give_up("output_limit", "wrote more than the output limit "
                                         "to the result channel", t0)
            if self._st_r in r:
                status = self._read_status(time.monotonic() + 0.001)
                if status is None and self._status_eof():
                    return self._give_up("crashed", "the sandbox worker went away", t0)
        wall = time.monotonic() - t0
        chunk = self._drain(self._res_r, cap + 1 - len(res_buf)) or b""
        res_buf += chunk
        self.executions += 1
        if not status.get("clean", True):
            self.start()  # the server exits when it cannot empty /tmp; replace it
        return self._interpret(task, status, bytes(res_buf), wall)

    def _status_eof(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    @staticmethod
    def _drain(fd: int, limit: int) -> bytes | None:
        out = bytearray()
        while limit > 0:
            try:
                chunk = os.read(fd, min(65536, limit))
            except BlockingIOError:
                break
            if not chunk:
                return bytes(out) if out else None
            out += chunk
            limit -= len(chunk)
        return bytes(out)

    def _give_up(self, status: str, why: str, t0: float) -> Result:
        """Kill the whole worker (everything inside dies with it) and start a fresh one."""
        wall = time.monotonic() - t0
        self.kill()
        try:
            self.start()
        except OSError:
            pass
        return Result(status=status, error=why, wall_s=wall, tier=self.tier,
                      extra={"kill_s": time.monotonic() - t0 - wall})

    def _interpret(self, task: Task, status: dict, raw: bytes, wall: float) -> Result:
        code = int(status.get("exit", 0))
        cpu = float(status.get("cpu", 0.0))
        frame = None
        if len(raw) >= _HDR.size:
            (n,) = _HDR.unpack_from(raw)
            if len(raw) == _HDR.size + n:
                try:
                    frame = json.loads(raw[_HDR.size:])
                except ValueError:
                    frame = None
        base = dict(wall_s=wall, cpu_s=cpu, tier=self.tier)
        if os.WIFSIGNALED(code):
            sig = os.WTERMSIG(code)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ \
                else str(sig)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= task.timeout):
                return Result(status="timeout", error=f"ran past its CPU limit ({name})",
                              **base)
            if sig == signal.SIGSYS:
                return Result(status="blocked", error="killed by the seccomp filter", **base)
            return Result(status="crashed", error=f"killed by {name}", **base)
        if not isinstance(frame, dict):
            return Result(status="crashed", error=f"exited with code {os.WEXITSTATUS(code)} "
                          "without a result", **base)
        st = frame.get("status")

        def text(key: str) -> str | None:
            v = frame.get(key)
            return v if isinstance(v, str) else None

        if st not in ("ok", "error", "memory", "output_limit", "blocked", "crashed"):
            return Result(status="crashed", error="malformed result", **base)
        return Result(status=st, stdout=text("stdout") or "", stderr=text("stderr") or "",
                      value_repr=text("value"), error_type=text("error_type"),
                      error=text("error"), traceback=text("traceback"), **base)


# --------------------------------------------------------------------------- tiers

@dataclass
class TierReport:
    """What ``megatron-sz sandbox doctor`` prints: the tier and why."""

    tier: str | None
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)


_PROBED: dict[tuple, tuple[str, str]] = {}
_WARNED: set[str] = set()
_PROBE_LOCK = threading.Lock()


def probe_bwrap(cfg: Config) -> str | None:
    """None if a bwrap worker starts and runs code here, else the reason it does not."""
    if not seccomp.supported():
        return f"no seccomp syscall table for {platform.machine()}"
    if _bwrap_path() is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    probe_cfg = Config(workers=1, tier="bwrap", start_timeout=30.0,
                       tmp_size=cfg.tmp_size, shm_size=cfg.shm_size)
    w = Worker(probe_cfg, "bwrap")
    try:
        w.start()
        w.wait_ready()
        res = w.execute(Task("x = 6 * 7", expr="x", timeout=10.0))
        if res.value_repr != "42":
            return f"a probe execution returned {res.describe()}"
        return None
    except (OSError, WorkerStartError) as exc:
        return f"bubblewrap cannot create the sandbox here (user namespaces disabled?): {exc}"
    finally:
        w.kill()


def choose_tier(cfg: Config) -> str:
    """The tier this pool gets; warns once when it has to fall back."""
    if cfg.tier in TIERS:
        return cfg.tier
    key = (cfg.tmp_size, cfg.shm_size)
    with _PROBE_LOCK:
        if key not in _PROBED:
            why = probe_bwrap(cfg)
            _PROBED[key] = ("process", why) if why else ("bwrap", "")
        tier, why = _PROBED[key]
    if tier == "process" and why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"sandbox: falling back to the 'process' tier (seccomp + rlimits + a "
                      f"separate process, no namespaces): {why}", RuntimeWarning, stacklevel=3)
    return tier


# --------------------------------------------------------------------------- pool

class Sandbox:
    """A pool of pre-started workers. ``run``/``run_batch`` are thread-safe.

    >>> with Sandbox(workers=2) as sb:
    ...     sb.run("def f(x):\\n    return x * 2", call="f", args="21").value()
    42
    """

    def __init__(self, config: Config | None = None, **kw) -> None:
        self.config = config if config is not None else Config(**kw)
        if not seccomp.supported():
            raise UserError(f"the sandbox has no seccomp filter for {platform.machine()}",
                            where="megatron_sz.sandbox",
                            fix="run untrusted code on x86_64 or aarch64 hosts")
        self.tier = choose_tier(self.config)
        self._idle: list[Worker] = []
        self._all: list[Worker] = []
        self._cv = threading.Condition()
        self._closed = False
        for _ in range(self.config.workers):
            w = Worker(self.config, self.tier)
            w.start()
            self._all.append(w)
            self._idle.append(w)
        _LIVE.add(self)

    # ---- context manager
    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            workers, self._all, self._idle = self._all, [], []
            self._cv.notify_all()
        for w in workers:
            w.kill()
        _LIVE.discard(self)

    def worker_pids(self) -> list[int]:
        """Host pids of the worker processes (outer bwrap or fallback server)."""
        return [w.proc.pid for w in list(self._all) if w.proc is not None]

    @property
    def restarts(self) -> int:
        return sum(max(0, w.restarts) for w in list(self._all))

    # ---- executions
    def _acquire(self) -> Worker:
        with self._cv:
            while not self._idle:
                if self._closed:
                    raise RuntimeError("the sandbox pool is closed")
                self._cv.wait()
            if self._closed:
                raise RuntimeError("the sandbox pool is closed")
            # prefer a worker that already finished starting
            for i, w in enumerate(self._idle):
                if w.ready:
                    return self._idle.pop(i)
            return self._idle.pop()

    def _release(self, w: Worker) -> None:
        with self._cv:
            if self._closed:
                w.kill()
                return
            self._idle.append(w)
            self._cv.notify()

    def submit(self, task: Task) -> Result:
        w = self._acquire()
        try:
            try:
                return w.execute(task)
            except WorkerStartError:
                w.start()  # one retry with a fresh worker: a start can fail under load
                return w.execute(task)
        finally:
            self._release(w)

    def run(self, code: str, **kw) -> Result:
        """Run one program; keyword arguments are ``Task``'s fields."""
        return self.submit(Task(code, **kw))

    def run_batch(self, tasks: list, **defaults) -> list[Result]:
        """Run many programs over the pool; results come back in the given order.

        Each item is a ``Task``, a dict of ``Task`` fields, or a code string; ``defaults``
        fill fields an item does not set.
        """
        built = [_as_task(t, defaults) for t in tasks]
        if len(built) <= 1 or self.config.workers == 1:
            return [self.submit(t) for t in built]
        with ThreadPoolExecutor(max_workers=self.config.workers,
                                thread_name_prefix="sandbox-batch") as ex:
            return list(ex.map(self.submit, built))


def _as_task(item, defaults: dict) -> Task:
    if isinstance(item, Task):
        return item
    if isinstance(item, str):
        return Task(item, **defaults)
    if isinstance(item, dict):
        return Task(**{**defaults, **item})
    raise UserError(f"a batch item must be a Task, dict or code string, got "
                    f"{type(item).__name__}", where="sandbox.run_batch",
                    fix="pass Task(...) objects or dicts with a 'code' key")


_LIVE: "set[Sandbox]" = set()


@atexit.register
def _close_all() -> None:
    for sb in list(_LIVE):
        try:
            sb.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
