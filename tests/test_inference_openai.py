"""The OpenAI-compatible HTTP client against real servers on loopback.

Servers are real processes (``tests/openai_server.py``, stdlib HTTP over a socket)
with injected failures, killed for real with SIGKILL; one test uses
``transformers serve`` with a tiny model built here.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_sz.inference import GenerationRequest, read_results, run_request_shard, write_requests
from megatron_sz.inference.openai_http import OpenAIBackend, normalize_endpoint
from megatron_sz.recipe import SamplingSpec

HERE = Path(__file__).resolve().parent


class Server:
    def __init__(self, tmp: Path, name: str, *flags: str):
        self.log = tmp / f"{name}.log"
        ready = tmp / f"{name}.port"
        self.proc = subprocess.Popen([sys.executable, str(HERE / "openai_server.py"), "--ready-file", str(ready),
                                      "--log", str(self.log), *flags])
        deadline = time.time() + 30
        while not ready.exists():
            if time.time() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"test server {name} did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{ready.read_text().strip()}/v1"

    def served(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(l) for l in self.log.read_text().splitlines() if l.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def servers(tmp_path):
    started: list[Server] = []

    def start(name: str, *flags: str) -> Server:
        s = Server(tmp_path, name, *flags)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def _requests(rng, count, n=1, prefix="q"):
    return [GenerationRequest(id=f"{prefix}{i}", prompt=f"problem {i} {rng.randrange(10**9)}", n=n,
                              sampling=SamplingSpec(temperature=0.8, max_tokens=32, seed=rng.randrange(1000)))
            for i in range(count)]


def _check_echo(req: GenerationRequest, texts: list[str]) -> None:
    last = req.prompt.strip().splitlines()[-1]
    assert len(texts) == req.n
    for t in texts:
        assert t.startswith(f"echo[{last}]#"), (req.id, t)


def test_normalize_endpoint():
    assert normalize_endpoint("localhost:8000") == "http://localhost:8000/v1"
    assert normalize_endpoint("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_endpoint("https://h/openai/v1") == "https://h/openai/v1"


def test_two_endpoints_one_killed_mid_run(servers, tmp_path, rng_seed, caplog):
    caplog.set_level(logging.WARNING, logger="megatron_sz.inference.openai")
    a = servers("a", "--delay-s", "0.05")
    b = servers("b", "--delay-s", "0.05")
    rng = random.Random(rng_seed)
    reqs = _requests(rng, 60, n=2)
    write_requests(tmp_path / "req.jsonl", reqs)
    be = OpenAIBackend([a.url, b.url], api="completions", concurrency=6, timeout_s=5, max_retries=8,
                       backoff_base_s=0.05, backoff_max_s=0.5, cooldown_s=1.0, seed=rng_seed)
    counts: dict = {}
    t = threading.Thread(target=lambda: counts.update(
        run_request_shard(be, tmp_path / "req.jsonl", tmp_path / "res.jsonl", progress=False)))
    t.start()
    deadline = time.time() + 30
    while len(a.served()) < 8 and time.time() < deadline:
        time.sleep(0.01)
    a.kill()
    served_by_a = len(a.served())
    t.join(timeout=120)
    assert not t.is_alive()
    assert counts["generated"] == 60 and counts["failed"] == 0
    results = read_results(tmp_path / "res.jsonl")
    assert sorted(r.id for r in results) == sorted(r.id for r in reqs)  # each exactly once
    by_id = {r.id: r for r in reqs}
    for r in results:
        _check_echo(by_id[r.id], r.texts)
    stats = counts["stats"]
    assert stats["retries"] >= 1 and stats["connection_errors"] >= 1
    assert stats["backoff_s"] > 0
    assert any("retrying in" in rec.getMessage() for rec in caplog.records)
    assert 8 <= served_by_a < 60 and len(b.served()) >= 60 - served_by_a
    be.close()


def test_timeouts_slow_server(servers, tmp_path, rng_seed, caplog):
    caplog.set_level(logging.WARNING, logger="megatron_sz.inference.openai")
    slow = servers("slow", "--slow-rate", "1", "--slow-s", "3")
    rng = random.Random(rng_seed)
    reqs = _requests(rng, 2)
    be = OpenAIBackend([slow.url], api="chat", concurrency=2, timeout_s=0.4, max_retries=1,
                       backoff_base_s=0.01, cooldown_s=0.01)
    write_requests(tmp_path / "req.jsonl", reqs)
    t0 = time.time()
    counts = run_request_shard(be, tmp_path / "req.jsonl", tmp_path / "res.jsonl", progress=False)
    assert time.time() - t0 < 5  # the client gave up; it did not wait for the 3 s replies
    assert counts["failed"] == 2 and counts["generated"] == 0
    assert be.stats["timeouts"] == 4 and be.stats["retries"] == 2
    assert read_results(tmp_path / "res.jsonl") == []  # failures are not written...
    ok = servers("ok")
    be2 = OpenAIBackend([ok.url], api="chat", timeout_s=5, max_retries=1)
    counts = run_request_shard(be2, tmp_path / "req.jsonl", tmp_path / "res.jsonl", progress=False)
    assert counts["generated"] == 2  # ...so a rerun retries them
    # Sometimes slow: retried on timeout, every request completes.
    flaky = servers("flaky", "--slow-rate", "0.3", "--slow-s", "2", "--seed", str(rng_seed % 1000))
    be3 = OpenAIBackend([flaky.url], api="chat", concurrency=8, timeout_s=0.5, max_retries=12,
                        backoff_base_s=0.01, backoff_max_s=0.05, cooldown_s=0.01)
    reqs3 = _requests(rng, 16, prefix="f")
    res = be3.generate(reqs3, progress=False)
    assert all(r.ok for r in res)
    for req, r in zip(reqs3, res):
        _check_echo(req, r.texts)
    assert be3.stats["completed"] == 16 and be3.stats["timeouts"] == be3.stats["retries"]


def test_injected_500s_drops_and_ignored_n(servers, rng_seed, caplog):
    caplog.set_level(logging.WARNING, logger="megatron_sz.inference.openai")
    s1 = servers("s1", "--error-rate", "0.2", "--drop-rate", "0.1", "--fail-first", "1",
                 "--drop-every", "3", "--seed", str(rng_seed % 1000))
    s2 = servers("s2", "--ignore-n", "--error-rate", "0.1", "--seed", str(rng_seed % 1000 + 1))
    rng = random.Random(rng_seed)
    reqs = _requests(rng, 30, n=3)
    be = OpenAIBackend([s1.url, s2.url], api="chat", concurrency=8, timeout_s=5, max_retries=30,
                       backoff_base_s=0.005, backoff_max_s=0.05, cooldown_s=0.05, balance="round_robin")
    seen = []
    res = be.generate(reqs, progress=False, on_result=seen.append)
    assert sorted(r.id for r in seen) == sorted(r.id for r in reqs)  # on_result exactly once each
    for req, r in zip(reqs, res):
        assert r.ok, r.meta
        _check_echo(req, r.texts)
        assert len(set(r.texts)) == 3  # distinct seeds per sub-request when n is ignored
    st = be.stats
    assert st["http_5xx"] >= 1 and st["connection_errors"] >= 1 and st["n_fallbacks"] >= 1
    assert st["retries"] == st["http_5xx"] + st["connection_errors"] + st["timeouts"] + st["bad_responses"]
    assert st["completed"] == 30 and st["failed"] == 0
    assert sum(1 for rec in caplog.records if "retrying in" in rec.getMessage()) == st["retries"]
    be.close()


def test_4xx_not_retried_and_round_robin(servers, rng_seed):
    s = servers("s")
    be = OpenAIBackend([s.url.replace("/v1", "/v2")], api="completions", max_retries=5, backoff_base_s=0.01)
    res = be.generate(_requests(random.Random(rng_seed), 1), progress=False)[0]
    assert not res.ok and "HTTP 404" in res.meta["error"]
    assert be.stats["attempts"] == 1 and be.stats["retries"] == 0
    t = servers("t")
    rr = OpenAIBackend([s.url, t.url], api="completions", concurrency=1, balance="round_robin")
    rr.generate(_requests(random.Random(rng_seed), 10), progress=False)
    assert len(s.served()) == 5 and len(t.served()) == 5


def test_killed_client_resumes_without_duplicates(servers, tmp_path, rng_seed):
    srv = servers("srv", "--delay-s", "0.15")
    rng = random.Random(rng_seed)
    reqs = _requests(rng, 24, n=2)
    write_requests(tmp_path / "req.jsonl", reqs)
    out = tmp_path / "res.jsonl"
    cmd = [sys.executable, "-m", "megatron_sz", "generate", "--requests", str(tmp_path / "req.jsonl"),
           "--results", str(out), "--backend", "openai", "--endpoint", srv.url, "--api", "completions",
           "--concurrency", "2", "--no-progress", "--model", "echo"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    done_before = len(read_results(out))
    assert 5 <= done_before < 24
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == done_before and summary["generated"] == 24 - done_before
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == sorted(r.id for r in reqs)  # every request exactly once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("transformers") is None, reason="transformers CLI not installed")
def test_transformers_serve_tiny_model(tmp_path, rng_seed):
    pytest.importorskip("fastapi", reason="transformers[serving] extra not installed")
    pytest.importorskip("uvicorn", reason="transformers[serving] extra not installed")
    from inference_support import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf_cache"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "hf_cache").mkdir()
    proc = subprocess.Popen(["transformers", "serve", str(model), "--port", str(port), "--device", "cpu",
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)
    try:
        be = OpenAIBackend([f"http://127.0.0.1:{port}/v1"], model=str(model), api="completions",
                           concurrency=2, timeout_s=60, max_retries=40, backoff_base_s=0.5,
                           backoff_max_s=2.0, cooldown_s=0.1)
        # The first requests arrive while the server still loads: they are retried.
        reqs = [GenerationRequest(id=f"t{i}", prompt=f"Compute {i} + 1.", n=2,
                                  sampling=SamplingSpec(temperature=0.8, max_tokens=4, seed=rng_seed % 100))
                for i in range(3)]
        res = be.generate(reqs, progress=False)
        assert all(r.ok for r in res), [r.meta for r in res]
        assert all(len(r.texts) == 2 and all(isinstance(t, str) for t in r.texts) for r in res)
        assert be.stats["completed"] == 3
        be.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
