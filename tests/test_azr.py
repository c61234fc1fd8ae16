"""Absolute Zero's task logic: rewards, format penalties, buffer sampling (hand-computed),
proposal validation over a corpus (valid / malformed / syntax / banned / nondeterministic /
timeout / crash / bad output), scoring of all three task types, and a corpus of escape
attempts written as AZR proposals, judged by what happens on the host."""
import os
import random
import socket
import threading
from pathlib import Path

import pytest

from megatron_sz.data import AzrProposal, AzrTask, AzrValidation, record_from_dict, record_to_dict
from megatron_sz.recipe import AZRSpec
from megatron_sz.systems import absolute_zero_tasks as T

SPEC = AZRSpec(timeout_s=2.0)


# --------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("acc,expected", [(0.0, 0.0), (1.0, 0.0), (1 / 8, 0.875), (0.5, 0.5), (5 / 8, 0.375),
                                          (7 / 8, 0.125)])
def test_learnability(acc, expected):
    assert T.learnability(acc) == pytest.approx(expected)


def test_format_penalties_and_proposer_reward():
    assert T.solver_reward("ok") == 1.0
    assert T.solver_reward("wrong") == -0.5
    assert T.solver_reward("malformed") == -1.0
    assert T.proposer_reward("valid", 3 / 8) == pytest.approx(0.625)
    assert T.proposer_reward("valid", 0.0) == 0.0 and T.proposer_reward("valid", 1.0) == 0.0
    assert T.proposer_reward("malformed", None) == -1.0
    for status in ("syntax", "banned", "nondeterministic", "timeout", "crash", "bad_output"):
        assert T.proposer_reward(status, None) == -0.5


def test_learnability_histogram_bins():
    assert [T.learnability_bin(a) for a in (0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.875, 1)] == \
        ["0", "<=0.25", "<=0.25", "<=0.5", "<=0.5", "<=0.75", "<1", "1"]


# --------------------------------------------------------------------------- buffers


def test_sample_references_small_buffer_returns_all_in_order():
    buf = ["a", "b", "c"]
    assert T.sample_references(buf, 3, random.Random(0)) == ["a", "b", "c"]
    assert T.sample_references(buf, 6, random.Random(0)) == ["a", "b", "c"]
    assert T.sample_references(["z"], 1, random.Random(5)) == ["z"]


def test_sample_references_distinct_ordered_uniform():
    buf = list("abcdef")
    counts = {x: 0 for x in buf}
    pairs = {}
    n = 6000
    rng = random.Random(42)
    for _ in range(n):
        got = T.sample_references(buf, 2, rng)
        assert len(got) == 2 and got[0] < got[1]  # distinct, buffer order
        for x in got:
            counts[x] += 1
        pairs[tuple(got)] = pairs.get(tuple(got), 0) + 1
    # hand-computed: each item is in a 2-of-6 sample with probability 2/6, each of the 15 pairs 1/15
    for x in buf:
        assert abs(counts[x] / n - 1 / 3) < 0.03
    assert len(pairs) == 15 and all(abs(c / n - 1 / 15) < 0.02 for c in pairs.values())


def test_records_roundtrip_and_validate():
    t = AzrTask(id="x", task_type="induction", program="def f(a):\n    return a", inputs=["1", "2"],
                outputs=["1", "2"], shown=1, message="id", parents=["p"], round=2)
    assert record_from_dict(AzrTask, record_to_dict(t)) == t
    v = AzrValidation(key="k", task_type="induction", status="valid", task=t)
    assert record_from_dict(AzrValidation, record_to_dict(v)).task == t
    from megatron_sz.errors import DataError

    with pytest.raises(DataError):
        record_from_dict(AzrTask, {**record_to_dict(t), "shown": 2})  # no hidden pair left
    with pytest.raises(DataError):
        record_from_dict(AzrValidation, {"key": "k", "task_type": "deduction", "status": "valid"})


# --------------------------------------------------------------------------- parsing + validation


def _prop(completion: str, tt: str = "deduction", program: str | None = None) -> AzrProposal:
    parsed = T.parse_proposal(tt, completion)
    if tt == "induction":
        parsed["program"] = program
    return AzrProposal(key=f"{tt}:{abs(hash(completion)) % 10**8}", task_type=tt, prompt="p", completion=completion,
                       references=["zero-deduction"], **parsed)


def _code(body: str, inp: str = "3") -> str:
    return f"<code>\n{body}\n</code>\n<input>{inp}</input>"


CORPUS = [
    (_code("def f(a):\n    return a + 1"), "valid"),
    (_code("def f(a, b):\n    return [a, b * 2]", "1, 'x'"), "valid"),
    (_code("```python\ndef f(a):\n    return sorted(a)\n```", "[3, 1, 2]"), "valid"),
    ("def f(a): return a", "malformed"),
    ("<code>\ndef f(a):\n    return a\n</code>", "malformed"),
    (_code("def f(a)\n    return a"), "syntax"),
    (_code("def g(a):\n    return a"), "syntax"),
    (_code("def f(a):\n    return a", "3,,"), "syntax"),
    (_code("import os\ndef f(a):\n    return os.path.join('a', str(a))"), "banned"),
    (_code("import subprocess\ndef f(a):\n    return a"), "banned"),
    (_code("def f(a):\n    return __import__('socket').gethostname()"), "banned"),
    (_code("import random\ndef f(a):\n    return a + random.randint(0, 9)"), "nondeterministic"),
    (_code("import time\ndef f(a):\n    return time.time() + a"), "nondeterministic"),
    # the policy misses it (no banned name); the two runs do not (each run is a fresh process)
    (_code("import os\ndef f(a):\n    return os.stat('/proc/self').st_ino"), "nondeterministic"),
    (_code("def f(a):\n    while True:\n        a += 1"), "timeout"),
    (_code("def f(a):\n    return a / 0"), "crash"),
    (_code("def f(a):\n    return a[10]", "[1]"), "crash"),
    (_code("def f(a):\n    return lambda: a"), "bad_output"),
]


def test_validation_classifies_the_corpus():
    props = [_prop(c) for c, _ in CORPUS]
    vals = T.validate_proposals(props, SPEC, round=3)
    got = [(c, v.status) for (c, _), v in zip(CORPUS, vals)]
    assert [s for _, s in got] == [e for _, e in CORPUS], [(c[:50], s, v.reason) for (c, s), v in zip(got, vals)]
    ok = vals[0].task
    assert ok.output == "4" and ok.input == "3" and ok.round == 3 and ok.parents == ["zero-deduction"]
    assert vals[1].task.output == "[1, 'xx']"


def test_induction_validation_outputs_from_the_sandbox():
    prog = "def f(a):\n    return a * 2"
    good = _prop("<input>1</input>\n<input>2</input>\n<input>'ab'</input>\n<input>[1]</input>\n<message>double</message>",
                 "induction", prog)
    no_msg = _prop("<input>1</input><input>2</input>", "induction", prog)
    one = _prop("<input>1</input><input>1</input><message>m</message>", "induction", prog)
    crash = _prop("<input>None</input><input>{}</input><message>m</message>", "induction", prog)
    v = T.validate_proposals([good, no_msg, one, crash], SPEC, round=1)
    assert [x.status for x in v] == ["valid", "malformed", "malformed", "crash"]
    t = v[0].task
    assert t.outputs == ["2", "4", "'abab'", "[1, 1]"] and t.shown == 2 and t.message == "double"


# --------------------------------------------------------------------------- scoring


def test_scoring_all_task_types():
    ded = AzrTask(id="d", task_type="deduction", program="def f(a):\n    return a % 3", input="7", output="1")
    abd = AzrTask(id="a", task_type="abduction", program="def f(a):\n    return a % 3", input="7", output="1")
    ind = AzrTask(id="i", task_type="induction", program="def f(a):\n    return a + 2", inputs=["1", "2", "5", "9"],
                  outputs=["3", "4", "7", "11"], shown=2, message="add")
    cases = [
        (ded, "<answer>1</answer>", ("ok", True)),
        (ded, "<answer>2</answer>", ("wrong", False)),
        (ded, "<answer>1 +</answer>", ("malformed", False)),
        (ded, "the answer is 1", ("malformed", False)),
        (abd, "<answer>4</answer>", ("ok", True)),          # any input with f(i) == o is correct
        (abd, "<answer>7</answer>", ("ok", True)),
        (abd, "<answer>6</answer>", ("wrong", False)),
        (abd, "<answer>'x'</answer>", ("wrong", False)),    # raises inside f: wrong, not malformed
        (ind, "<answer>\ndef f(a):\n    return a + 2\n</answer>", ("ok", True)),
        (ind, "<answer>\ndef f(a):\n    return 2 + a if a < 9 else 11\n</answer>", ("ok", True)),
        (ind, "<answer>\ndef f(a):\n    return a + 1\n</answer>", ("wrong", False)),
        (ind, "<answer>\ndef f(a):\n    while True: pass\n</answer>", ("wrong", False)),
        (ind, "<answer>\ndef g(a):\n    return a\n</answer>", ("malformed", False)),
    ]
    got = T.score_answers([(t, text) for t, text, _ in cases], SPEC)
    assert got == [e for _, _, e in cases]


# --------------------------------------------------------------------------- escape attempts


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                hits.append(1)
                c.close()
            except OSError:
                pass
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    return srv, hits, stop


def test_escape_attempts_as_proposals_are_rejected_or_contained(tmp_path):
    secret = tmp_path / "secret.txt"
    canary = "CANARY-" + os.urandom(6).hex()
    secret.write_text(canary)
    target = tmp_path / "pwned"
    srv, hits, stop = _listener()
    port = srv.getsockname()[1]
    s, tg = str(secret), str(target)
    bodies = [
        f"def f(a):\n    return open({s!r}).read()",
        f"def f(a):\n    open({tg!r}, 'w').write('x')\n    return a",
        f"def f(a):\n    import os\n    os.system('touch {tg}')\n    return a",
        "def f(a):\n    import os\n    return os.listdir('/home') + os.listdir('/root')",
        f"def f(a):\n    g = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]\n"
        f"    return g(['touch', {tg!r}]).wait()",
        f"def f(a):\n    b = f.__globals__['__builtins__']\n    o = b['__import__']('o' + 's')\n"
        f"    o.system('touch {tg}')\n    return 1",
        f"def f(a):\n    import socket as s\n    c = s.create_connection(('127.0.0.1', {port}), timeout=1)\n    return 1",
        f"def f(a):\n    x = getattr(__builtins__, '__im' + 'port__', None) or __builtins__['__im' + 'port__']\n"
        f"    return x('so' + 'cket').create_connection(('127.0.0.1', {port}), timeout=1) and 1",
        "def f(a):\n    import os\n    while True:\n        os.fork()",
        "def f(a):\n    import os\n    os.kill(os.getppid(), 9)\n    return a",
        "def f(a):\n    import ctypes\n    return ctypes.CDLL(None).syscall(57)",
        "def f(a):\n    x = 'a' * (1 << 34)\n    return len(x)",
        "def f(a):\n    print('y' * 10**7)\n    return a",
        f"def f(a):\n    import os\n    return os.environ.get('HOME', '') + str(os.path.exists({s!r}))",
        "def f(a):\n    exec(\"import os; os.system('id')\")\n    return a",
    ]
    props = [_prop(_code(b), "deduction") for b in bodies]
    try:
        vals = T.validate_proposals(props, SPEC, round=0)
    finally:
        stop.set()
        srv.close()
    assert not target.exists(), "a proposal wrote a file on the host"
    assert not hits, "a proposal reached a host listener"
    for b, v in zip(bodies, vals):
        text = repr(record_to_dict(v))
        assert canary not in text, f"the host secret leaked through: {b[:60]}"
        if v.status == "valid":  # contained: it ran, but saw nothing of the host
            assert "root" not in (v.task.output or "") or "/root" not in v.task.output
    # the pool still works afterwards
    assert T.validate_proposals([_prop(_code("def f(a):\n    return a * 3"))], SPEC, round=0)[0].task.output == "9"
    assert secret.read_text() == canary and Path(tmp_path).is_dir()
