"""`megatron-sz eval code`: code-benchmark files in their public layouts (HumanEval+, MBPP+,
LiveCodeBench, CRUXEval), scripted completions served by a loopback OpenAI-compatible
server, every test executed in the sandbox; pass@k and mean@k compared with an
independent computation (exact binomials with fractions)."""
import json
import subprocess
import sys
import threading
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import comb
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GOOD_ADD = "```python\ndef add(a, b):\n    return a + b\n```"
BAD_ADD = "```python\ndef add(a, b):\n    return a - b\n```"
GOOD_SQ = "    return x * x\n"           # HumanEval-style continuation of the prompt
BAD_SQ = "    return x + x\n"
GOOD_REV = "```python\ndef rev(s):\n    return s[::-1]\n```"
BAD_REV = "```python\ndef rev(s):\n    return s\n```"
LCB_STDIN_GOOD = "```python\nn = int(input())\nprint(n * 2)\n```"
LCB_STDIN_BAD = "```python\nn = int(input())\nprint(n + 2)\n```"
LCB_FN_GOOD = "```python\nclass Solution:\n    def twoSum(self, a, b):\n        return a + b\n```"
LCB_FN_BAD = "```python\nclass Solution:\n    def twoSum(self, a, b):\n        import os\n        os.system('touch /tmp/x')\n        return 0\n```"

# prompt marker -> the completions of samples 0..3 (c correct of n = 4)
SCRIPT = {
    "def add(": [GOOD_ADD, BAD_ADD, GOOD_ADD, BAD_ADD],                # HumanEval/0: c = 2
    "def square(": [BAD_SQ, BAD_SQ, BAD_SQ, GOOD_SQ],                  # HumanEval/1: c = 1
    "Reverse a string": [GOOD_REV, GOOD_REV, GOOD_REV, GOOD_REV],      # MBPP: c = 4
    "Double the number": [LCB_STDIN_BAD, LCB_STDIN_GOOD, LCB_STDIN_BAD, LCB_STDIN_BAD],  # c = 1
    "Add two numbers": [LCB_FN_BAD, LCB_FN_BAD, LCB_FN_BAD, LCB_FN_BAD],  # c = 0
    "assert f(3) == ??": ["[ANSWER]7[/ANSWER]", "[ANSWER]6[/ANSWER]", "[ANSWER]3 * 2 + 1[/ANSWER]", "junk"],  # O: c = 2
    "assert f(??) == 7": ["[ANSWER]3[/ANSWER]", "[ANSWER]3[/ANSWER]", "[ANSWER]4[/ANSWER]", "[ANSWER]3[/ANSWER]"],  # I: c = 3
}
EXPECTED_C = {("humaneval", "HumanEval/0"): 2, ("humaneval", "HumanEval/1"): 1, ("mbpp", "Mbpp/1"): 4,
              ("livecodebench", "lcb1"): 1, ("livecodebench", "lcb2"): 0, ("cruxeval-o", "sample_0"): 2,
              ("cruxeval-i", "sample_0"): 3}


def _server():
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            prompt = body.get("prompt") or "\n".join(m["content"] for m in body.get("messages", []))
            texts = next(v for k, v in SCRIPT.items() if k in prompt)
            n = int(body.get("n") or 1)
            chat = "messages" in body
            choices = [({"index": i, "message": {"role": "assistant", "content": texts[i]}} if chat else
                        {"index": i, "text": texts[i]}) | {"finish_reason": "stop"} for i in range(n)]
            out = json.dumps({"id": "x", "object": "text_completion", "choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _files(tmp: Path) -> list[Path]:
    he = _write(tmp / "HumanEvalPlus.jsonl", [
        {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
         "canonical_solution": "    return a + b\n",
         "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
        {"task_id": "HumanEval/1", "prompt": "def square(x):\n", "entry_point": "square",
         "test": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(2) == 4\n"}])
    mb = _write(tmp / "MbppPlus.jsonl", [
        {"task_id": "Mbpp/1", "prompt": "Reverse a string.", "entry_point": "rev",
         "test_list": ["assert rev('ab') == 'ba'"], "test": "assert rev('abc') == 'cba'\nassert rev('') == ''"}])
    lcb = _write(tmp / "livecodebench_v5.jsonl", [
        {"question_id": "lcb1", "question_content": "Double the number.", "starter_code": "",
         "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
         "private_test_cases": json.dumps([{"input": "10\n", "output": "20\n", "testtype": "stdin"}]),
         "metadata": json.dumps({})},
        {"question_id": "lcb2", "question_content": "Add two numbers.",
         "starter_code": "class Solution:\n    def twoSum(self, a, b):\n",
         "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
         "private_test_cases": "eJzLSM3JyQcABiwCFQ==", "metadata": json.dumps({"func_name": "twoSum"})}])
    cx = _write(tmp / "cruxeval.jsonl", [{"id": "sample_0", "code": "def f(x):\n    return 2 * x + 1",
                                          "input": "3", "output": "7"}])
    return [he, mb, lcb, cx]


def _pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_eval_code_scripted_server_pass_at_k(tmp_path):
    srv, url = _server()
    out = tmp_path / "out"
    try:
        res = subprocess.run([sys.executable, "-m", "megatron_sz", "eval", "code", "--benchmarks",
                              *map(str, _files(tmp_path)), "--backend", "openai", "--endpoint", url,
                              "--served-model", "scripted", "--k", "4", "--pass-k", "1", "2", "4", "--out", str(out),
                              "--quiet"], capture_output=True, text=True, timeout=300)
    finally:
        srv.shutdown()
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    got_c: dict = {}
    for s in samples:
        got_c[(s["benchmark"], s["problem_id"])] = got_c.get((s["benchmark"], s["problem_id"]), 0) + s["correct"]
    assert got_c == EXPECTED_C
    results = json.loads((out / "results.json").read_text())
    by = {b["benchmark"]: b for b in results["benchmarks"]}
    assert set(by) == {"humaneval", "mbpp", "livecodebench", "cruxeval-o", "cruxeval-i"}
    assert by["livecodebench"]["public_tests_only"] == 1  # lcb2's private tests are not JSON: not unpickled
    for name, b in by.items():
        cs = [c for (bn, _), c in EXPECTED_C.items() if bn == name]
        for k in (1, 2, 4):
            want = sum(_pass_at_k(4, c, k) for c in cs) / len(cs)
            assert b["pass_at_k"][str(k)] == pytest.approx(float(want), abs=1e-12), (name, k)
        assert b["mean_at_k"] == pytest.approx(sum(Fraction(c, 4) for c in cs) / len(cs))
    assert "humaneval: 2 problems x 4: mean@4 0.3750" in res.stdout
