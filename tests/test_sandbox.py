"""``megatron_sz.sandbox``: typed results, limits, the determinism helper, the code policy,
the fallback tier and the seccomp program itself. The escape corpus is in
``test_sandbox_escapes.py``.
"""
from __future__ import annotations

import os
import random
import struct
import time
import warnings

import pytest

from megatron_sz import sandbox
from megatron_sz.errors import UserError
from megatron_sz.sandbox import Config, Sandbox, Task, check_deterministic, check_policy
from megatron_sz.sandbox import seccomp


@pytest.fixture(scope="module")
def sb():
    with Sandbox(Config(workers=2)) as pool:
        yield pool


def test_call_with_literal_args_and_typed_result(sb, rng_seed):
    rng = random.Random(rng_seed)
    xs = [rng.randint(-50, 50) for _ in range(5)]
    code = "def f(xs, k):\n    print('called')\n    return sorted(x * k for x in xs)\n"
    r = sb.run(code, call="f", args=(xs, 3))
    assert r.status == "ok" and r.ok, r.describe()
    assert r.value() == sorted(x * 3 for x in xs)
    assert r.value_repr == repr(sorted(x * 3 for x in xs))
    assert r.stdout == "called\n"
    assert r.tier in sandbox.TIERS and r.wall_s > 0 and r.cpu_s >= 0
    # Absolute Zero's input format: the text of the arguments
    r2 = sb.run(code, call="f", args=f"{xs!r}, 3")
    assert r2.value() == r.value()


def test_expr_cell_and_stdout(sb):
    assert sb.run("x = 6 * 7", expr="x * 2").value() == 84
    r = sb.run("import math\nprint('a')\nmath.factorial(5)", cell=True)
    assert (r.stdout, r.value()) == ("a\n", 120)
    assert sb.run("print('only')").value_repr is None


@pytest.mark.parametrize("code,kw,status,etype", [
    ("raise ValueError('bad input')", {}, "error", "ValueError"),
    ("def g(:\n", {}, "error", "SyntaxError"),
    ("x = 1", {"call": "f"}, "error", "NameError"),
    ("x = bytearray(2 << 30)", {"memory": 256 << 20}, "memory", "MemoryError"),
    ("import socket\nsocket.socket()", {}, "blocked", "PermissionError"),
    ("print('y' * 5000)", {"output_limit": 100}, "output_limit", None),
    ("x = 'z' * 5000", {"expr": "x", "value_limit": 100}, "output_limit", None),
    ("import os\nos._exit(3)", {}, "crashed", None),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", {}, "crashed", None),
    ("import sys\nsys.exit(2)", {}, "error", "SystemExit"),
])
def test_statuses(sb, code, kw, status, etype):
    r = sb.run(code, **kw)
    assert r.status == status, r.describe()
    assert r.error_type == etype
    if status == "output_limit" and "output_limit" in kw:
        assert r.stdout == "y" * 100  # the first part is kept


def test_error_carries_message_and_traceback(sb):
    r = sb.run("def f(x):\n    return 1 / x\n", call="f", args="0")
    assert r.status == "error" and r.error_type == "ZeroDivisionError"
    assert "division by zero" in r.error and "<program>" in r.traceback


def test_timeouts_are_enforced_promptly(sb):
    for code in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        t0 = time.monotonic()
        r = sb.run(code, timeout=0.5)
        assert r.status == "timeout", r.describe()
        assert 0.5 <= r.wall_s < 1.0
        assert time.monotonic() - t0 < 3.0  # includes starting the replacement worker
    assert sb.run("1", expr="1").ok  # the pool recovered


def test_run_batch_keeps_order_and_mixes_outcomes(sb):
    tasks = [Task("def f(x):\n    return x * x", call="f", args=str(i)) for i in range(30)]
    tasks[7] = Task("while True:\n    pass", timeout=0.5)
    tasks[13] = {"code": "raise KeyError('k')"}
    res = sb.run_batch(tasks)
    assert [r.status for r in res].count("ok") == 28
    assert res[7].status == "timeout" and res[13].error_type == "KeyError"
    assert [r.value() for i, r in enumerate(res) if i not in (7, 13)] == \
        [i * i for i in range(30) if i not in (7, 13)]


def test_no_state_between_executions(sb):
    sb.run("import math\nmath.leak = 1\nopen('/tmp/leak', 'w').write('1')\nglobal_leak = 2")
    for _ in range(4):  # whichever worker answers
        r = sb.run("import math, os\nprint(hasattr(math, 'leak'), os.listdir('/tmp'), "
                   "'global_leak' in globals())")
        assert r.stdout == "False [] False\n", r.stdout


def test_determinism_helper(sb):
    good = check_deterministic("def f(x):\n    return sorted({str(i) for i in range(x)})",
                               call="f", args="20", sandbox=sb)
    assert good.deterministic and len(good.results) == 2
    bad = check_deterministic("import os\ndef f():\n    return os.urandom(8)", call="f",
                              sandbox=sb)
    assert not bad.deterministic and "disagree" in bad.reason
    slow = check_deterministic("while True:\n    pass", timeout=0.3, sandbox=sb)
    assert not slow.deterministic and "timeout" in slow.reason


def test_code_policy_reasons():
    assert check_policy("def f(x):\n    return x + 1", function="f").ok
    cases = {
        "def f(:": "does not parse",
        "def g(x):\n    return x": "does not define the function 'f'",
        "import random\ndef f():\n    return random.random()": "imports banned module 'random'",
        "from os import path\ndef f():\n    return 1": "uses banned name 'os.path'",
        "import os\ndef f():\n    return os.environ['X']": "uses banned name 'os.environ'",
        "def f():\n    return __import__('subprocess')": "imports banned module 'subprocess'",
        "import importlib\ndef f(m):\n    return importlib.import_module(m)": "dynamic import",
        "def f(x):\n    return id(x)": "nondeterministic id()",
    }
    for code, reason in cases.items():
        rep = check_policy(code, function="f")
        assert not rep.ok and any(reason in r for r in rep.reasons), (code, rep.reasons)
    # the policy reads code, not text: the word alone is fine
    assert check_policy("def f():\n    return 'random time'", function="f").ok
    rep = check_policy("import numpy\nanswer = 1", banned=(), allowed_imports=("sympy",))
    assert rep.reasons == ("import of 'numpy' is not allowed (line 1; allowed: sympy)",)


def test_bad_arguments_are_user_errors(sb):
    for kw in ({"timeout": 0}, {"timeout": float("nan")}, {"memory": 1000},
               {"call": "f(x)"}, {"call": "f", "expr": "f()"}, {"args": (object(),)}):
        with pytest.raises(UserError):
            sb.run("def f():\n    pass", **{"call": "f", **kw} if "call" not in kw and
                   "expr" not in kw else kw)
    with pytest.raises(UserError):
        Config(tier="docker")


def test_seccomp_program_shape():
    for machine in ("x86_64", "aarch64"):
        for stage in ("base", "server", "child"):
            prog = seccomp.build_filter(stage, machine=machine)
            assert len(prog) % 8 == 0 and 10 < len(prog) // 8 < 4096
            last = struct.unpack("<HBBI", prog[-8:])
            assert last == (0x06, 0, 0, 0x7FFF0000)  # ends in RET ALLOW
        jumps = [struct.unpack("<HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
        n = len(jumps)
        assert all(i + 1 + max(jt, jf) < n for i, (code, jt, jf, _) in enumerate(jumps)
                   if code & 0x07 == 0x05)  # every jump lands inside the program
    assert seccomp.PID_PLACEHOLDER in seccomp.child_template("x86_64")
    with pytest.raises(seccomp.SeccompUnsupported):
        seccomp.build_filter("base", machine="mips")


def test_fallback_tier_contains_the_basics(tmp_path, monkeypatch):
    """Forced via the environment, as on a node without unprivileged user namespaces."""
    monkeypatch.setenv(sandbox.TIER_ENV, "process")
    marker = tmp_path / "pwned"
    if os.geteuid() == 0:
        os.chmod(tmp_path, 0o755)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forcing a tier is not a fallback: no warning
        pool = Sandbox(Config(workers=1))
    with pool:
        assert pool.tier == "process"
        assert pool.run("def f(x):\n    return x + 1", call="f", args="1").value() == 2
        assert pool.run("import socket\nsocket.create_connection(('127.0.0.1', 1))"
                        ).status == "blocked"
        assert pool.run("import os\nos.fork()").status == "blocked"
        assert pool.run("import subprocess\nsubprocess.run(['true'])").status in (
            "blocked", "error")
        assert pool.run(f"open({str(marker)!r}, 'w').write('x')").status in ("blocked", "error")
        r = pool.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        assert r.status == "blocked", r.describe()
        assert pool.run("x = bytearray(2 << 30)", memory=256 << 20).status == "memory"
        assert pool.run("while True:\n    pass", timeout=0.5).status == "timeout"
        assert pool.run("import os\nprint(sorted(os.environ))").stdout.strip() == \
            "['HOME', 'LANG', 'PYTHONHASHSEED', 'TMPDIR']"
        assert pool.run("1", expr="1").ok
    assert not marker.exists()


def test_module_level_run_uses_a_shared_pool():
    try:
        r = sandbox.run("def f(s):\n    return s[::-1]", call="f", args="'abc'")
        assert r.value() == "cba"
        assert [x.value() for x in sandbox.run_batch(["1 + 1", "2 + 2"], cell=True)] == [2, 4]
    finally:
        sandbox.shutdown()
