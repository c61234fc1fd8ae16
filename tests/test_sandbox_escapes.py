"""Escape corpus for ``megatron_sz.sandbox`` (issue 14): every attempt must end blocked or
contained, judged by outcomes on the host, not by which layer stopped it.

For each attempt we check, besides its own expectations:

* no canary secret (an env var of this process, a file in the checkout, a file in $HOME)
  appears in anything the sandbox returned;
* no file appeared outside the sandbox's private tmp (checkout, $HOME, host /tmp, /dev/shm);
* the loopback listener this test opened was never connected to;
* after ``run()`` returns, no process is left beyond each worker's own (outer bwrap, the
  PID-1 server and its pre-forked spare child), and no uid-65534 process lives elsewhere;
* at the end the pool still answers, with every worker healthy.

The attempts run against the tier this host gets (bwrap here and in CI); the fallback
tier has its own, smaller set in ``test_sandbox.py``.
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_sz.sandbox import Config, Sandbox

ROOT = Path(__file__).resolve().parents[1]
TOKEN = secrets.token_hex(8)
CANARY = "canary-" + secrets.token_hex(12)


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _descendants(pid: int, kids: dict[int, list[int]]) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _live_uid(pid: int) -> int | None:
    """The uid of a process that is alive (zombies count as gone: they hold no resources)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _snapshot(dirs: list[Path]) -> set[str]:
    names = set()
    for d in dirs:
        try:
            names |= {f"{d}/{n}" for n in os.listdir(d)}
        except OSError:
            pass
    return names


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = Path(os.path.expanduser("~"))
    canary_files = [ROOT / f".sandbox-canary-{TOKEN}", home / f".sandbox-canary-{TOKEN}"]
    for f in canary_files:
        f.write_text(CANARY + "\n")
    os.environ["SZ_SANDBOX_CANARY"] = CANARY
    listener = Listener()
    watch = [ROOT, home, Path("/tmp"), Path("/dev/shm"), ROOT / "tests"]
    before = _snapshot(watch)
    sb = Sandbox(Config(workers=2, site_packages=True, preload=("sympy",)))
    for w in sb._all:
        w.wait_ready()
    yield dict(sb=sb, listener=listener, home=home, watch=watch, before=before,
               canary_files=canary_files)
    sb.close()
    listener.close()
    for f in canary_files:
        f.unlink()
    os.environ.pop("SZ_SANDBOX_CANARY", None)


def _fill(code: str, env: dict) -> str:
    return (code.replace("{port}", str(env["listener"].port))
            .replace("{token}", TOKEN).replace("{root}", str(ROOT))
            .replace("{home}", str(env["home"])).replace("{ppid}", str(os.getpid())))


# (name, code, run keywords, statuses accepted, strings that must not appear in the output)
# Every output is also checked for the canary and every host check runs after each one.
ATTEMPTS = [
    # ---- reading outside
    ("etc_passwd", "print(open('/etc/passwd').read())", {}, ("error",), ["root:x:0:0"]),
    ("etc_shadow", "print(open('/etc/shadow').read())", {}, ("error", "blocked"), []),
    ("checkout_canary", "print(open('{root}/.sandbox-canary-{token}').read())", {},
     ("error", "blocked"), []),
    ("checkout_listing", "import os; print(os.listdir('{root}'))", {}, ("error", "blocked"),
     ["setup.py", "megatron_sz"]),
    ("home_canary", "print(open('{home}/.sandbox-canary-{token}').read())", {},
     ("error", "blocked"), []),
    ("home_listing", "import os; print(os.listdir('{home}'))", {}, ("ok", "error", "blocked"),
     [".sandbox-canary", ".bashrc", ".cache"]),
    ("parent_environ", "print(open('/proc/{ppid}/environ').read())", {}, ("error", "blocked"),
     []),
    ("server_environ_and_mem",
     "import os\nout = []\nfor p in ('/proc/1/environ', '/proc/1/cmdline'):\n"
     "    try: out.append(open(p).read())\n    except OSError as e: out.append(repr(e))\n"
     "try: open('/proc/1/mem', 'rb').read(16)\nexcept OSError as e: out.append(repr(e))\n"
     "else: out.append('MEM-READ')\nprint(out)", {}, ("ok",), ["MEM-READ"]),
    ("server_fds", "import os\nprint(os.listdir('/proc/1/fd'))", {}, ("error", "blocked"), []),
    ("own_environ", "import os; print(dict(os.environ))", {}, ("ok",), ["SLURM", "PATH"]),
    ("walk_root_for_canary",
     "import os\nfor d, subs, files in os.walk('/'):\n"
     "    if d.startswith(('/proc', '/sys')): subs[:] = []; continue\n"
     # pip's folders (read-only binds of the host's) are big: walking torch takes seconds
     "    subs[:] = [s for s in subs if s not in ('site-packages', 'dist-packages')]\n"
     "    for f in files:\n        if 'canary' in f: print(os.path.join(d, f))",
     {"timeout": 10},
     ("ok",), [".sandbox-canary"]),
    ("inherited_fds",
     "import os\nfound = []\nfor fd in range(3, 256):\n"
     "    try: found.append((fd, os.readlink(f'/proc/self/fd/{fd}')))\n"
     "    except OSError: pass\n"
     "    try: print(os.listdir(fd))\n    except OSError: pass\nprint(found)", {},
     ("ok",), ["/work", "/root", "/usr"]),
    # ---- writing outside
    ("write_checkout", "open('{root}/pwned-{token}', 'w').write('x')", {},
     ("error", "blocked"), []),
    ("write_home", "open('{home}/pwned-{token}', 'w').write('x')", {}, ("error", "blocked"), []),
    ("write_stdlib", "import os\nopen(os.__file__, 'a').write('# pwned')", {},
     ("error", "blocked"), []),
    ("write_usr_lib", "open('/usr/lib64/pwned-{token}', 'w').write('x')", {},
     ("error", "blocked"), []),
    ("write_root_dir", "import os; os.mkdir('/pwned-{token}')", {}, ("error", "blocked"), []),
    ("write_proc_sys", "open('/proc/sys/kernel/hostname', 'w').write('pwned')", {},
     ("error", "blocked"), []),
    ("write_dev", "open('/dev/pwned-{token}', 'w').write('x')", {}, ("error", "blocked"), []),
    ("dev_shm_write", "open('/dev/shm/x-{token}', 'w').write('private')\nprint('wrote')", {},
     ("ok",), []),
    # ---- network
    ("tcp_loopback", "import socket\ns = socket.create_connection(('127.0.0.1', {port}), 2)",
     {}, ("blocked", "error"), []),
    ("unix_socket", "import socket\nsocket.socket(socket.AF_UNIX).connect('/tmp/x')", {},
     ("blocked", "error"), []),
    ("dns", "import socket\nprint(socket.getaddrinfo('example.com', 80))", {},
     ("blocked", "error"), []),
    ("socketpair", "import socket\nprint(socket.socketpair())", {}, ("blocked", "error"), []),
    ("urllib", "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', "
     "timeout=2)", {}, ("blocked", "error"), []),
    ("raw_socket_syscall",
     "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "fd = libc.syscall(41, 2, 1, 0)\nprint('fd', fd, ctypes.get_errno())\n"
     "assert fd < 0", {}, ("ok",), []),
    ("io_uring",
     "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(120)\n"
     "fd = libc.syscall(425, 8, buf)\nassert fd < 0, fd\nprint('denied', ctypes.get_errno())",
     {}, ("ok",), []),
    # ---- processes
    ("subprocess", "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch {root}/pwned-{token}'])",
     {}, ("error", "blocked"), []),
    ("subprocess_python", "import subprocess, sys\n"
     "print(subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True))",
     {}, ("error", "blocked"), []),
    ("os_system", "import os\nrc = os.system('touch {root}/pwned-{token}')\nprint(rc)", {},
     ("ok", "error", "blocked"), []),
    ("execv", "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'print(1)'])",
     {}, ("error", "blocked"), []),
    ("posix_spawn", "import os, sys\nos.posix_spawn(sys.executable, [sys.executable], {})", {},
     ("error", "blocked"), []),
    ("fork_lingers",
     "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
     "    time.sleep(30)\n    os._exit(0)\nprint('parent returns')", {},
     ("ok", "blocked", "error"), []),
    ("double_fork_daemon",
     "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
     "        time.sleep(2)\n        open('/tmp/daemon-{token}', 'w').write('still here')\n"
     "        time.sleep(60)\n    os._exit(0)\nprint('returned')", {},
     ("ok", "blocked", "error"), []),
    ("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
     "        pass", {"timeout": 1.5}, ("timeout", "blocked", "error", "crashed"), []),
    ("thread_bomb", "import threading, time\nts = []\nwhile True:\n"
     "    t = threading.Thread(target=time.sleep, args=(60,)); t.start(); ts.append(t)",
     {"timeout": 2}, ("error", "memory", "blocked", "timeout", "crashed"), []),
    ("multiprocessing", "import multiprocessing as mp\np = mp.Process(target=print)\np.start()",
     {}, ("error", "blocked", "ok"), []),
    # ---- resources
    ("memory_bomb", "x = bytearray(8 << 30)", {"memory": 256 << 20}, ("memory",), []),
    ("memory_growth", "x = []\nwhile True:\n    x.append(' ' * (1 << 20))",
     {"memory": 256 << 20, "timeout": 5}, ("memory", "crashed"), []),
    ("mmap_8g", "import mmap\nm = mmap.mmap(-1, 8 << 30)\nm[-1] = 1", {"memory": 256 << 20},
     ("error", "memory", "crashed"), []),
    ("cpu_spin", "while True:\n    pass", {"timeout": 1}, ("timeout",), []),
    ("sleep_past_timeout", "import time\ntime.sleep(100)", {"timeout": 1}, ("timeout",), []),
    ("infinite_print", "while True:\n    print('spam' * 100)", {"timeout": 5},
     ("output_limit",), []),
    ("infinite_raw_write", "import os\nwhile True:\n    os.write(1, b'x' * 65536)",
     {"timeout": 1}, ("timeout", "error", "blocked"), []),
    ("huge_sparse_file", "f = open('/tmp/big', 'wb')\nf.seek(1 << 40)\nf.write(b'x')\nf.flush()", {},
     ("error", "blocked", "crashed"), []),
    ("fill_tmp", "f = open('/tmp/fill', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))",
     {"timeout": 5}, ("error", "blocked"), []),
    ("fd_exhaustion", "fs = []\nwhile True:\n    fs.append(open('/dev/null'))", {},
     ("error",), []),
    ("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", {}, ("error",), []),
    ("deep_recursion_unlimited", "import sys\nsys.setrecursionlimit(10**8)\n"
     "def f(n):\n    return f(n + 1)\nf(0)", {"timeout": 5},
     ("crashed", "error", "memory", "timeout"), []),
    # ---- native and introspection tricks
    ("kill_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
     "os.kill(1, signal.SIGKILL)\nprint('alive')", {}, ("ok", "blocked", "error"), []),
    ("kill_everything", "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')", {},
     ("ok", "blocked", "error", "crashed"), []),
    ("kill_host_pid", "import os, signal\nos.kill({ppid}, signal.SIGTERM)", {},
     ("error", "blocked"), []),
    ("ptrace_server", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "rc = libc.ptrace(16, 1, 0, 0)\nassert rc != 0, 'attached'\nprint(ctypes.get_errno())",
     {}, ("ok",), []),
    ("mount_syscall", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) != 0\n"
     "assert libc.mount(b'/', b'/tmp', None, 0x1000, None) != 0\nprint('denied')",
     {}, ("ok",), []),
    ("unshare_userns", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.unshare(0x10000000) != 0\nassert libc.unshare(0x20000) != 0\nprint('denied')",
     {}, ("ok",), []),
    ("clone3_and_clone_ns", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.syscall(435, 0, 0) == -1 and ctypes.get_errno() == 38\n"
     "assert libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0) == -1\nprint('denied')",
     {}, ("ok",), []),
    ("keyctl_bpf_perf", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.syscall(250, 0, -3, 0) == -1\nassert libc.syscall(321, 0, 0, 0) == -1\n"
     "attr = ctypes.create_string_buffer(128)\n"
     "assert libc.syscall(298, attr, 0, -1, -1, 0) == -1\nprint('denied')", {}, ("ok",), []),
    ("sysv_ipc", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.shmget(0, 4096, 0o1666) == -1\nassert libc.msgget(0, 0o1666) == -1\n"
     "assert libc.semget(0, 1, 0o1666) == -1\nprint('denied')", {}, ("ok",), []),
    ("memfd_userfaultfd", "import os, ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.syscall(323, 0) == -1\ntry:\n    os.memfd_create('x')\n"
     "except OSError:\n    print('denied')\nelse:\n    raise SystemExit('memfd allowed')",
     {}, ("ok",), []),
    ("setuid_root", "import os\nos.setuid(0)", {}, ("blocked", "error"), []),
    ("subclasses_wrap_close",
     "for c in ().__class__.__base__.__subclasses__():\n"
     "    if c.__name__ == '_wrap_close':\n"
     "        c.__init__.__globals__['system']('touch {root}/pwned-{token}')\n"
     "        c.__init__.__globals__['popen']('id').read()", {},
     ("ok", "error", "blocked"), []),
    ("builtins_walk",
     "b = (lambda: 0).__globals__['__builtins__']\n"
     "imp = b['__import__'] if isinstance(b, dict) else b.__import__\n"
     "imp('os').system('touch {root}/pwned-{token}')\n"
     "print(imp('os').listdir('{root}'))", {}, ("error", "blocked", "ok"), ["setup.py"]),
    ("importlib_tricks",
     "import importlib, importlib.util\n"
     "spec = importlib.util.spec_from_file_location('m', '{root}/megatron_sz/__init__.py')\n"
     "m = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\nprint(m)", {},
     ("error", "blocked"), []),
    ("import_project", "import megatron_sz\nprint(megatron_sz.__file__)", {}, ("error",), []),
    ("sympy_sympify", "import sympy\nsympy.sympify(\"__import__('os').system('touch "
     "{root}/pwned-{token}')\")\nprint(sympy.sympify(\"__import__('os').listdir('{root}')\"))",
     {}, ("error", "blocked", "ok"), ["setup.py"]),
    ("sympy_globals_import",
     "import sympy\nimp = sympy.sympify.__globals__['__builtins__']['__import__']\n"
     "imp('os').system('touch {root}/pwned-{token}')\n"
     "print(imp('subprocess').run(['id'], capture_output=True))", {},
     ("error", "blocked"), []),
    # ---- state carried between executions
    ("leave_state", "import math, sys\nopen('/tmp/state-{token}', 'w').write('x')\n"
     "open('/dev/shm/state-{token}', 'w').write('x')\nmath.pwned = 1\n"
     "sys.modules['json'] = None\nimport threading, time\n"
     "threading.Thread(target=time.sleep, args=(60,), daemon=False).start()\nprint('left')",
     {}, ("ok",), []),
    ("see_state", "import os, math\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')),"
     " hasattr(math, 'pwned'))\nimport json\nprint('json ok', json.dumps(1))", {},
     ("ok",), ["state-", "daemon-", "True", "x-"]),
]


def test_corpus_is_large_enough():
    assert len(ATTEMPTS) >= 40
    assert len({a[0] for a in ATTEMPTS}) == len(ATTEMPTS)


def _host_checks(env: dict, name: str) -> list[str]:
    bad = []
    sb: Sandbox = env["sb"]
    kids = _children()
    workers = sb.worker_pids()
    owned = set(workers)
    for pid in workers:
        d = {p for p in _descendants(pid, kids) if _live_uid(p) is not None}
        owned |= d
        if len(d) > 3:  # bwrap's sandbox process (the PID-1 server) + its spare child (+1 slack)
            bad.append(f"{name}: worker {pid} has {len(d)} processes after run() returned")
    me = os.getpid()
    for pid in _descendants(1, kids):
        if pid != me and pid not in owned and _live_uid(pid) == 65534:
            bad.append(f"{name}: a uid-65534 process {pid} lives outside the workers")
    after = _snapshot(env["watch"])
    new = {p for p in after - env["before"] if TOKEN in p or "pwned" in p or "state-" in p
           or "daemon-" in p}
    if new:
        bad.append(f"{name}: files appeared outside the sandbox: {sorted(new)}")
    if env["listener"].hits:
        bad.append(f"{name}: the loopback listener got {env['listener'].hits} connection(s)")
    return bad


@pytest.mark.timeout(150)
def test_escape_corpus(env):
    sb: Sandbox = env["sb"]
    failures = []
    t_start = time.monotonic()
    for name, code, kw, statuses, forbidden in ATTEMPTS:
        kw = dict({"timeout": 3}, **kw)
        t0 = time.monotonic()
        r = sb.run(_fill(code, env), **kw)
        elapsed = time.monotonic() - t0
        shown = " ".join(str(x) for x in (r.stdout, r.stderr, r.value_repr, r.error,
                                          r.traceback) if x)
        if r.status not in statuses:
            failures.append(f"{name}: status {r.status} not in {statuses}: {r.describe()}")
        if CANARY in shown:
            failures.append(f"{name}: the canary secret leaked")
        for s in forbidden:
            if s in shown:
                failures.append(f"{name}: output contains {s!r}: {shown[:300]!r}")
        if r.status == "timeout" and r.wall_s > kw["timeout"] + 0.5:
            failures.append(f"{name}: timeout took {r.wall_s:.2f}s for a {kw['timeout']}s limit")
        if elapsed > kw["timeout"] + 15:  # includes restarting a worker (sympy preload)
            failures.append(f"{name}: run() took {elapsed:.1f}s")
        if name == "cpu_spin" and r.wall_s < 0.99:
            failures.append(f"{name}: killed early ({r.wall_s:.2f}s)")
        failures += _host_checks(env, name)
    # the pool is healthy afterwards: every worker answers, in parallel
    res = sb.run_batch([{"code": "def f(x):\n    return x * 2", "call": "f", "args": str(i)}
                        for i in range(20)])
    assert [r.value() for r in res] == [2 * i for i in range(20)], [r.describe() for r in res]
    for w in sb._all:
        w.wait_ready()
    assert not failures, "\n".join(failures)
    assert time.monotonic() - t_start < 140


def test_lingering_child_is_gone_when_run_returns(env):
    sb: Sandbox = env["sb"]
    r = sb.run("import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
               "print(os.getpid())")
    assert r.ok, r.describe()
    assert not _host_checks(env, "lingering")


def test_known_seed_escapes_are_contained(env):
    """The three escapes of the old ``seeds validate`` runner (issue 14)."""
    sb: Sandbox = env["sb"]
    marker = ROOT / f"pwned-seed-{TOKEN}"
    codes = [
        f"import sympy\nanswer = sympy.sympify(\"__import__('os').system('touch {marker}')\")",
        "import sympy\nfor c in ().__class__.__base__.__subclasses__():\n"
        "    if c.__name__ == '_wrap_close':\n"
        f"        c.__init__.__globals__['system']('touch {marker}')\nanswer = 1",
        "import sympy\nimp = sympy.sympify.__globals__['__builtins__']['__import__']\n"
        f"imp('os').system('touch {marker}')\nanswer = 1",
    ]
    for code in codes:
        r = sb.run(code, expr="answer")
        assert r.status in ("ok", "error", "blocked"), r.describe()
        assert not marker.exists()
    assert not _host_checks(env, "seed escapes")
    assert sys.executable  # the host interpreter is untouched and still here
