"""The fork server that runs INSIDE the sandbox (stdlib only: it never imports megatron_sz).

The host starts it as ``python -s -S -B -c <this file's text>`` inside bubblewrap (or, in
the fallback tier, as a plain child process). What is unusual here:

* **It never holds task data.** Before each request arrives it forks a spare child; the
  *child* reads the request from fd 0, so code and inputs only ever exist in a process that
  is thrown away. The server only learns the child's exit status and rusage.
* **It is PID 1 of its PID namespace** (bwrap ``--as-pid-1``) with default signal
  dispositions, so the kernel drops every signal a child sends it, and it is non-dumpable,
  so a child cannot open ``/proc/1/mem`` or ``/proc/1/fd``.
* **After every execution** it kills everything else in the namespace (``kill(-1, SIGKILL)``),
  reaps it, and wipes the writable places (``/tmp``, ``/dev/shm``), so nothing carries over.
  In the fallback tier there is no PID namespace: children may not fork at all (seccomp),
  and the server kills only its own child.
* Channels: fd 0 carries length-prefixed JSON requests (host -> child), fd 1 carries one
  length-prefixed JSON result per execution (child -> host), and a private status fd
  (server -> host, closed in every child) carries ``{"exit", "cpu", ...}`` after cleanup.
  Results are plain JSON strings (a repr, stdout text), never pickles.
"""
import ast
import builtins
import ctypes
import json
import os
import resource
import signal
import struct
import sys
import time
import traceback

_HDR = struct.Struct("<Q")
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 4, 22, 2


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("channel closed")
        buf += chunk
    return bytes(buf)


def read_frame(fd):
    (n,) = _HDR.unpack(_read_exact(fd, _HDR.size))
    return json.loads(_read_exact(fd, n).decode("utf-8"))


def write_frame(fd, obj):
    data = json.dumps(obj, ensure_ascii=True).encode("ascii")
    data = _HDR.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def install_filter(prog_hex):
    """Load one classic-BPF seccomp program (built on the host by ``seccomp.py``)."""
    prog = bytes.fromhex(prog_hex)
    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    fprog = SockFprog(len(prog) // 8, prog)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def _close_other_fds(keep):
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _wipe(path):
    """Empty ``path`` (not the directory itself). Returns False if something stayed."""
    ok = True
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return True
    except PermissionError:
        try:
            os.chmod(path, 0o700)
            entries = list(os.scandir(path))
        except OSError:
            return False
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                try:
                    os.chmod(e.path, 0o700)
                except OSError:
                    pass
                ok = _wipe(e.path) and ok
                os.rmdir(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            ok = False
    return ok


# --------------------------------------------------------------------------- the child

class _OutputLimit(BaseException):
    """Raised inside user code when it prints past the cap (BaseException: hard to swallow)."""


class _Capture:
    """A text stream that keeps the first ``limit`` characters and then refuses more."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, limit):
        self.limit = limit
        self.parts = []
        self.size = 0
        self.exceeded = False

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.exceeded:
            raise _OutputLimit()
        room = self.limit - self.size
        if len(s) > room:
            self.parts.append(s[:room])
            self.size = self.limit
            self.exceeded = True
            raise _OutputLimit()
        self.parts.append(s)
        self.size += len(s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False

    def writable(self):
        return True

    def text(self):
        return "".join(self.parts)


def _set_limits(req, cfg):
    mem = int(req["memory"])
    lims = [
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_DATA, mem),
        (resource.RLIMIT_CPU, max(1, int(req["cpu_limit"]))),
        (resource.RLIMIT_FSIZE, int(req["file_size"])),
        (resource.RLIMIT_NOFILE, int(req["open_files"])),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ]
    if cfg.get("nproc"):
        lims.append((resource.RLIMIT_NPROC, int(cfg["nproc"])))
    for what, value in lims:
        resource.setrlimit(what, (value, value))


def _run_user_code(req, out, err):
    """Execute the program and compute the requested value. Returns the result dict."""
    res = {"status": "ok", "value": None, "error_type": None, "error": None, "traceback": None}
    g = {"__name__": "__main__", "__builtins__": builtins}
    try:
        try:
            tree = compile(req["code"], "<program>", "exec", ast.PyCF_ONLY_AST)
            last = None
            if req.get("cell") and tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<program>", "exec"), g)  # noqa: S102 - this is the sandbox
            value, have = None, False
            if last is not None:
                value, have = eval(compile(last, "<program>", "eval"), g), True  # noqa: S307
            if req.get("call"):
                fn = g.get(req["call"])
                if not callable(fn):
                    raise NameError(f"the program defines no function named {req['call']!r}")
                args = ast.literal_eval("(" + req.get("args", "") + ",)") \
                    if req.get("args", "").strip() else ()
                value, have = fn(*args), True
            elif req.get("expr"):
                value, have = eval(req["expr"], g), True  # noqa: S307
            if have:
                text = repr(value)
                if len(text) > req["value_limit"]:
                    res["status"] = "output_limit"
                    res["error"] = f"the value's repr is {len(text)} characters " \
                                   f"(limit {req['value_limit']})"
                    text = text[:req["value_limit"]]
                res["value"] = text
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    except _OutputLimit:
        res["status"] = "output_limit"
    except BaseException as exc:  # noqa: BLE001 - whatever the program raised is its result
        if out.exceeded or err.exceeded:
            res["status"] = "output_limit"
        elif isinstance(exc, MemoryError):
            res["status"] = "memory"
        elif isinstance(exc, OSError) and exc.errno in (1, 13, 30, 38):  # EPERM EACCES EROFS ENOSYS
            res["status"] = "blocked"
        else:
            res["status"] = "error"
        try:
            res["error_type"] = type(exc).__name__
            res["error"] = str(exc)[:2000]
            tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
            res["traceback"] = "".join(tb)[-4000:]
        except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
            res["error_type"] = res["error_type"] or "Exception"
    if out.exceeded or err.exceeded:
        res["status"] = "output_limit"
    return res


def child_main(cfg, status_fd):
    """One execution: read the request, limit ourselves, run, write the result, exit."""
    os.close(status_fd)
    try:
        req = read_frame(0)
    except BaseException:  # noqa: BLE001 - host went away
        os._exit(3)
    res_fd = os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    me = os.getpid()
    t0, c0 = time.monotonic(), time.process_time()
    out, err = _Capture(int(req["output_limit"])), _Capture(int(req["output_limit"]))
    try:
        if cfg["tier"] == "process":
            os.setsid()
            pid_le = struct.pack("<I", os.getpid()).hex()  # BPF immediates are little-endian
            install_filter(cfg["child_filter_template"].replace("%PID%", pid_le))
        _set_limits(req, cfg)
        sys.stdout, sys.stderr = out, err
        res = _run_user_code(req, out, err)
    except BaseException as exc:  # noqa: BLE001 - a failure in our own set-up code
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        res = {"status": "crashed", "error_type": type(exc).__name__,
               "error": "sandbox set-up failed: " + str(exc)[:500]}
    if os.getpid() != me:
        os._exit(0)  # a process the program forked: only the execution's own child reports
    res["stdout"] = out.text()
    res["stderr"] = err.text()
    res["inner_wall"] = time.monotonic() - t0
    res["inner_cpu"] = time.process_time() - c0
    try:
        write_frame(res_fd, res)
    except BaseException:  # noqa: BLE001 - e.g. the result itself was unencodable
        os._exit(4)
    os._exit(0)


# --------------------------------------------------------------------------- the server

def _reap_all():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def serve(cfg, status_fd):
    report = {"ready": True}
    while True:
        pid = os.fork()  # the spare child, forked before its request exists
        if pid == 0:
            try:
                child_main(cfg, status_fd)
            finally:
                os._exit(5)
        write_frame(status_fd, report)  # "ready", or the previous execution's outcome
        while True:
            try:
                _, status, ru = os.wait4(pid, 0)
                break
            except InterruptedError:
                continue
        if cfg["tier"] == "bwrap":
            try:
                os.kill(-1, signal.SIGKILL)  # PID 1: everything in the namespace but us
            except ProcessLookupError:
                pass
            _reap_all()
        else:
            try:
                os.killpg(pid, signal.SIGKILL)  # the child's own session (it cannot fork)
            except (ProcessLookupError, PermissionError):
                pass
        clean = all([_wipe(d) for d in cfg["wipe"]])
        report = {"exit": status, "cpu": ru.ru_utime + ru.ru_stime,
                  "maxrss_kb": ru.ru_maxrss, "clean": clean}
        if not clean:
            write_frame(status_fd, report)
            os._exit(0)  # the host restarts a worker whose writable places stay dirty


def main():
    status_fd = int(sys.argv[1])
    cfg = read_frame(0)
    _close_other_fds({0, 1, 2, status_fd})
    for name in dir(signal):  # default dispositions: a signal cannot run server Python code
        if name.startswith("SIG") and not name.startswith("SIG_") and name not in (
                "SIGKILL", "SIGSTOP", "SIGCHLD", "SIGPIPE", "SIGXFSZ"):
            try:
                signal.signal(getattr(signal, name), signal.SIG_DFL)
            except (OSError, ValueError, RuntimeError):
                pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # host gone -> EPIPE, not a silent death
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE: EFBIG, as in CPython
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    sys.path[:0] = cfg["sys_path"]
    for mod in cfg["preload"]:
        __import__(mod)
    if cfg.get("warmup"):  # OUR code (e.g. build a parser's lazy tables), never a task's
        exec(cfg["warmup"], {"__name__": "__warmup__"})  # noqa: S102
    if cfg["tier"] == "process":
        os.chdir(cfg["wipe"][0])
        os.environ.clear()
        os.environ.update(cfg["env"])
    install_filter(cfg["server_filter"])
    sys.stderr.flush()
    devnull = os.open("/dev/null", os.O_WRONLY)
    os.dup2(devnull, 2)  # the start-up diagnostics pipe is done
    os.close(devnull)
    import gc

    gc.collect()
    gc.freeze()  # forked children then share the server's objects without copy-on-write
    serve(cfg, status_fd)


if __name__ == "__main__":
    main()
