"""Rollouts: deterministic contiguous shards, k verified samples per problem, resumable files."""
from __future__ import annotations

import random

import pytest

from inference_support import ScriptedBackend, build_tiny_model
from megatron_sz.data import Problem, Trajectory, read_jsonl
from megatron_sz.errors import UserError
from megatron_sz.inference.local import LocalBackend
from megatron_sz.recipe import SamplingSpec
from megatron_sz.rollout import rollout, shard_slice, solver_prompt
from megatron_sz.teacher.symbolic import SymbolicTeacher


def test_shard_slice_partitions(rng_seed):
    rng = random.Random(rng_seed)
    for _ in range(50):
        items = list(range(rng.randrange(0, 40)))
        n = rng.randint(1, 9)
        shards = [shard_slice(items, i, n) for i in range(n)]
        assert sum(shards, []) == items  # contiguous, ordered, each item once
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert shards == [shard_slice(items, i, n) for i in range(n)]
    with pytest.raises(UserError):
        shard_slice([1, 2], 2, 2)


def test_solver_prompt_templates(tmp_path):
    p = Problem(id="a", problem="Compute 2 + 2.", answer="4")
    text = solver_prompt(p)
    assert "Compute 2 + 2." in text and "\\boxed{}" in text and "step by step" in text
    assert solver_prompt(p, "Q: {problem}\nA:") == "Q: Compute 2 + 2.\nA:"
    f = tmp_path / "t.txt"
    f.write_text("{problem} => \\boxed{}")
    assert solver_prompt(p, str(f)) == "Compute 2 + 2. => \\boxed{}"
    with pytest.raises(UserError):
        solver_prompt(p, "no placeholder here")


def test_rollout_verifies_with_rules(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    probs = SymbolicTeacher(seed=0).sample_problems(8, seed=rng_seed, difficulty=(1, 2))
    truth: dict[tuple[str, int], bool | None] = {}

    def reply(req, j, _call):
        pid = req.meta["problem_id"]
        answer = next(p.answer for p in probs if p.id == pid)
        kind = rng.choice(["right", "wrong", "none"])
        truth[(pid, j)] = {"right": True, "wrong": False, "none": None}[kind]
        return {"right": f"so \\boxed{{{answer}}}", "wrong": f"so \\boxed{{{int(answer) + 1}}}",
                "none": "no idea"}[kind]

    trajs = rollout(probs, ScriptedBackend(reply), k=3, sampling=SamplingSpec(), template="{problem}",
                    out_path=tmp_path / "t.jsonl")
    assert len(trajs) == 24
    for t in trajs:
        want = truth[(t.problem_id, t.sample_index)]
        if want is None:
            # "no idea" has no number: the rules cannot decide -> left to the teacher.
            assert t.correct is None and t.verifier == "none"
        else:
            assert t.correct is want and t.verifier == "rule"
    on_disk = read_jsonl(tmp_path / "t.jsonl", Trajectory)
    assert [(t.problem_id, t.sample_index, t.text) for t in on_disk] == \
           [(t.problem_id, t.sample_index, t.text) for t in trajs]


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory):
    return LocalBackend(build_tiny_model(tmp_path_factory.mktemp("tiny")), seed=7, batch_size=16)


def test_local_rollout_shards_deterministic_and_resumable(tiny_backend, tmp_path, rng_seed):
    probs = SymbolicTeacher(seed=1).sample_problems(5, seed=rng_seed, difficulty=1)
    sampling = SamplingSpec(temperature=0.9, max_tokens=6, seed=11)
    whole = rollout(probs, tiny_backend, k=2, sampling=sampling, template="{problem}\n",
                    out_path=tmp_path / "all.jsonl", progress=False)
    assert len(whole) == 10 and [t.sample_index for t in whole[:2]] == [0, 1]
    parts = []
    for i in range(2):
        parts += rollout(probs, tiny_backend, k=2, sampling=sampling, template="{problem}\n",
                         out_path=tmp_path / f"s{i}.jsonl", shard=(i, 2), progress=False)
    assert [(t.problem_id, t.sample_index, t.text) for t in parts] == \
           [(t.problem_id, t.sample_index, t.text) for t in whole]
    # Kill simulation: keep 3 lines + half a line; the rerun regenerates only what is missing.
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    (tmp_path / "all.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:15])
    calls = []
    orig = tiny_backend.generate

    def counting(requests, **kw):
        calls.extend(r.id for r in requests)
        return orig(requests, **kw)

    tiny_backend.generate = counting
    try:
        again = rollout(probs, tiny_backend, k=2, sampling=sampling, template="{problem}\n",
                        out_path=tmp_path / "all.jsonl", progress=False)
    finally:
        del tiny_backend.generate
    assert len(calls) == 4  # problem 0 and 1 done (lines 0-2 cover problem 0 and half of 1)
    assert [t.text for t in again] == [t.text for t in whole]
    on_disk = read_jsonl(tmp_path / "all.jsonl", Trajectory)
    assert len(on_disk) == 10
    assert len({(t.problem_id, t.sample_index) for t in on_disk}) == 10
