"""Request/result shard files shared by every backend (vLLM included): round trips, clear
errors for bad lines, resumable runs that never duplicate a result."""
from __future__ import annotations

import json
import random

import pytest

from inference_support import ScriptedBackend
from megatron_sz.errors import DataError, UserError
from megatron_sz.inference import (GenerationRequest, make_backend, read_requests, read_results,
                                   run_request_shard, write_requests)
from megatron_sz.recipe import BackendSpec, SamplingSpec


def _random_requests(rng, count):
    out = []
    for i in range(count):
        prompt = "".join(rng.choice("abc xyz\\{}\"'\n") for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.4:
            prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
        out.append(GenerationRequest(
            id=f"r{i}-{rng.randrange(10**6)}", prompt=prompt, n=rng.randint(1, 4),
            sampling=SamplingSpec(temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                                  max_tokens=rng.randint(1, 64), seed=rng.choice([None, rng.randrange(100)]),
                                  stop=rng.choice([[], ["\n\n"]])),
            meta={"problem_id": f"p{i}"}))
    return out


def test_requests_round_trip(tmp_path, rng_seed):
    reqs = _random_requests(random.Random(rng_seed), 20)
    write_requests(tmp_path / "r.jsonl", reqs)
    assert read_requests(tmp_path / "r.jsonl") == reqs


@pytest.mark.parametrize("line,needle", [
    ("{not json", "invalid JSON"),
    ('{"id": "a"}', "missing 'prompt'"),
    ('{"id": "a", "prompt": "x", "n": 0}', "'n' must be an integer >= 1"),
    ('{"id": "a", "prompt": "x", "sampling": {"temprature": 0.5}}', "unknown sampling field"),
    ('{"id": "a", "prompt": "x", "sampling": {"top_p": 0}}', "top_p"),
    ('{"id": "a", "prompt": [{"text": "x"}]}', "'prompt' must be a string or a list"),
    ('{"id": "a", "prompt": "x", "color": 1}', "unknown request field"),
    ('{"id": "ok", "prompt": "x"}', "duplicate request id"),
])
def test_bad_request_lines(tmp_path, line, needle):
    f = tmp_path / "r.jsonl"
    f.write_text('{"id": "ok", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        read_requests(f)
    assert needle in str(err.value)
    if "duplicate" not in needle:
        assert f"{f}:2" in str(err.value)


def test_resumable_exactly_once(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    reqs = _random_requests(rng, 30)
    write_requests(tmp_path / "req.jsonl", reqs)
    flaky = {r.id for k, r in enumerate(reqs) if k < 3 or rng.random() < 0.3}  # >= 3 failures
    first = ScriptedBackend(lambda req, j, c: RuntimeError("boom") if req.id in flaky else f"{req.id}/{j}")
    counts = run_request_shard(first, tmp_path / "req.jsonl", tmp_path / "res.jsonl", progress=False)
    assert counts["failed"] == len(flaky) and counts["generated"] == 30 - len(flaky)
    # Interrupted run: the backend dies (like a SIGTERM'd job) after a few results.
    class Dies(ScriptedBackend):
        def generate(self, requests, *, progress=True, on_result=None):
            for k, req in enumerate(requests):
                if k == 2:
                    raise KeyboardInterrupt
                super().generate([req], on_result=on_result)
    with pytest.raises(KeyboardInterrupt):
        run_request_shard(Dies(lambda req, j, c: f"{req.id}/{j}"), tmp_path / "req.jsonl",
                          tmp_path / "res.jsonl", progress=False)
    second = ScriptedBackend(lambda req, j, c: f"{req.id}/{j}")
    counts = run_request_shard(second, tmp_path / "req.jsonl", tmp_path / "res.jsonl", progress=False)
    assert counts["skipped"] == 30 - len(flaky) + 2
    assert {r.id for r in second.calls} <= flaky
    results = read_results(tmp_path / "res.jsonl")
    assert sorted(r.id for r in results) == sorted(r.id for r in reqs)
    by_id = {r.id: r for r in reqs}
    for r in results:
        assert r.texts == [f"{r.id}/{j}" for j in range(by_id[r.id].n)]
        assert r.meta["problem_id"] == by_id[r.id].meta["problem_id"]
    third = ScriptedBackend(lambda req, j, c: "x")
    assert run_request_shard(third, tmp_path / "req.jsonl", tmp_path / "res.jsonl",
                             progress=False)["skipped"] == 30 and not third.calls
    assert all(json.loads(line) for line in (tmp_path / "res.jsonl").read_text().splitlines())


def test_make_backend_errors():
    with pytest.raises(UserError, match="model folder"):
        make_backend(BackendSpec(kind="local"))
    with pytest.raises(UserError, match="config.json"):
        make_backend(BackendSpec(kind="local", model="/nonexistent/model"))
