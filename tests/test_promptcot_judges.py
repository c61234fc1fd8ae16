"""PromptCoT's LLM judges end to end over real HTTP: the judge and select stages run
through ``executor.execute_stage`` against two loopback OpenAI-compatible servers
(``tests/openai_server.py``, one per judge), scripted to return rubric replies.

Covered: both judges perfect -> kept with weight 1; one judge imperfect -> weight 0;
malformed replies retried (``teacher.max_parse_retries``) and then recorded with their
malformed class, counted in the judge and select markers; a parsed-but-imperfect or a
repaired reply is not retried; HTTP 500s (transient: recovered by the client's retries;
persistent: a ``backend_failed`` record) and timeouts; a rerun asks only what is missing.
Every record is read back the way the stages read it (``read_jsonl`` of the typed record).
"""
from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import openai_server
from megatron_sz.data import (CandidateProblem, JudgeScore, SynthesizedProblem, WeightedExample, read_jsonl,
                              write_jsonl)

ROOT = Path(__file__).resolve().parents[1]
P5 = dict(format=5, correctness=5, difficulty=5, concept_coverage=5, solvability=5)
ALL5 = json.dumps({**P5, "reason": "fine"})


def rubric(**kw) -> str:
    return json.dumps({**P5, **kw, "reason": "scripted"})


# --------------------------------------------------------------------------- scripted servers

_here = threading.local()  # the JudgeServer whose handler thread is answering


class JudgeServer:
    """A real ``openai_server`` over a loopback socket whose replies come from ``script``:
    problem text -> the replies of its 1st, 2nd, ... request (the last one repeats).
    Failure injection (``error_rate``, ``fail_first``, ``delay_s``...) is the server's own."""

    def __init__(self, name: str, **kw):
        self.name = name
        self.script: dict[str, list[str]] = {}
        self.calls: Counter = Counter()  # problem -> replies produced (successful HTTP answers)
        self.prompts: dict[str, str] = {}
        self.lock = threading.Lock()
        self.cfg = openai_server.Config(**kw)
        outer = self

        class Handler(openai_server.make_handler(self.cfg)):
            def do_POST(self):
                _here.server = outer
                try:
                    super().do_POST()
                finally:
                    _here.server = None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def reply(self, prompt: str) -> str:
        m = re.search(r"\nProblem:\n(.*?)\n\nScore each criterion", prompt, re.S)
        assert m, f"not a judge prompt: {prompt[:200]!r}"
        problem = m.group(1)
        with self.lock:
            i = self.calls[problem]
            self.calls[problem] += 1
            self.prompts[problem] = prompt
        replies = self.script.get(problem) or [ALL5]
        return replies[min(i, len(replies) - 1)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers(monkeypatch):
    """``make(**kw_a), make(**kw_b)`` -> two JudgeServers; shut down after the test."""
    made: list[JudgeServer] = []
    monkeypatch.setattr(openai_server, "echo_text", lambda prompt, i: _here.server.reply(prompt))

    def make(name: str, **kw) -> JudgeServer:
        s = JudgeServer(name, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# --------------------------------------------------------------------------- a run with sampled candidates

FAST = {"max_retries": 0, "backoff_base_s": 0.0, "backoff_max_s": 0.0, "cooldown_s": 0.0, "timeout_s": 10}


def make_run(tmp_path: Path, a: JudgeServer, b: JudgeServer, cands: list[CandidateProblem], *, shards: int = 1,
             judge_shards: int | None = None, retries: int = 2, backend_a: dict | None = None,
             backend_b: dict | None = None):
    """A PromptCoT run dir with round 0's ``sample`` stage done (``cands`` split over
    ``shards`` sample shards) and an LLM teacher (``judge_shards`` shards, default
    ``shards``): judge_a on the teacher's backend (server a), judge_b on its own backend
    (server b)."""
    from megatron_sz.recipe import load_recipe
    from megatron_sz.round import _tag
    from megatron_sz.rollout import shard_slice
    from megatron_sz.rundir import RunDir

    r = yaml.safe_load((ROOT / "recipes" / "promptcot-tiny.yaml").read_text())
    r["teacher"] = {"kind": "llm", "shards": judge_shards or shards, "max_parse_retries": retries,
                    "backend": {"kind": "openai", "endpoints": [a.url], "model": "judge-a-model",
                                **FAST, **(backend_a or {})}}
    r["promptcot"]["judges"] = [
        {"name": "judge_a", "sampling": {"temperature": 0.0, "max_tokens": 256}},
        {"name": "judge_b", "sampling": {"temperature": 0.0, "max_tokens": 256},
         "backend": {"kind": "openai", "endpoints": [b.url], "model": "judge-b-model", **FAST, **(backend_b or {})}}]
    r["generator"]["rollout"]["shards"] = shards
    r["curriculum"] = {"contamination_files": []}
    r["wandb"] = {"mode": "disabled"}
    path = tmp_path / "judges.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    recipe = load_recipe(path)
    rd = RunDir.create_or_open(tmp_path / "run", recipe_text=path.read_text(), recipe_source=str(path),
                              name="pc-judges", seed=1)
    write_jsonl(rd.prepare_dir / "heldout.jsonl", [])
    cands = sorted(cands, key=lambda c: c.id)
    for i in range(shards):
        write_jsonl(rd.round_dir(0) / "sample" / f"shard-{_tag(i, shards)}.jsonl", shard_slice(cands, i, shards))
        rd.mark_done(0, "sample", (i, shards))
    rd.mark_done(0, "sample", None, shards=shards)
    return rd, recipe


def cand(i: int, problem: str | None, *, concepts=("modular arithmetic", "primes"), difficulty=3,
         status: str = "ok") -> CandidateProblem:
    text = f" Combine the concepts.\nProblem: {problem}" if problem else "I could not write a problem"
    return CandidateProblem(id=f"r000-q{i:05d}-s0", round=0, request_id=f"r000-q{i:05d}",
                            prompt=f"Concepts: {', '.join(concepts)}\nDifficulty: {difficulty}\nRationale:",
                            text=text, concepts=list(concepts), difficulty=difficulty,
                            rationale="Combine the concepts." if problem else None, problem=problem, status=status)


def run_stage(rd, recipe, name: str) -> None:
    from megatron_sz.executor import execute_stage

    assert execute_stage(rd, recipe, 0, name, progress=False)["status"] == "done"


def judge_records(rd) -> dict[tuple[str, str], JudgeScore]:
    """Every JudgeScore of round 0 (as the select stage reads them), keyed, each once."""
    recs = [s for f in sorted((rd.round_dir(0) / "judge").glob("shard-*.jsonl"))
            for s in read_jsonl(f, JudgeScore, allow_partial_tail=True)]
    keyed = {(s.candidate_id, s.judge): s for s in recs}
    assert len(keyed) == len(recs), "a (candidate, judge) pair was scored twice"
    return keyed


def judge_marker_counts(rd, shards: int) -> Counter:
    total: Counter = Counter()
    for i in range(shards):
        m = rd.read_marker(0, "judge", (i, shards))
        assert m is not None, f"judge shard {i} has no marker"
        total.update({k: v for k, v in m.items() if k.startswith(("judge_a.", "judge_b."))})
    assert rd.read_marker(0, "judge")["shards"] == shards
    return total


def selected(rd):
    out = rd.round_dir(0)
    rs = {e.problem_id: e for e in read_jsonl(out / "rs.jsonl", WeightedExample)}
    kept = {p.candidate_id: p for p in read_jsonl(out / "kept.jsonl", SynthesizedProblem)}
    return rs, kept, rd.read_marker(0, "select")


# --------------------------------------------------------------------------- (a) + (b)


def test_two_judges_keep_only_what_both_rate_perfect(tmp_path, servers):
    """Both perfect -> weight 1 and kept (with both judges' scores); either judge below
    the top on any criterion -> weight 0; an unparsed candidate is never sent to a judge.
    Two sample shards and two judge shards (correlated), so the markers add up per shard."""
    a, b = servers("a"), servers("b")
    problems = {0: "Find the least prime p with p = 3 (mod 4) and p > 50.",
                1: "Find the remainder when 2^100 is divided by 7.",
                2: "How many primes below 30 are 1 (mod 4)?",
                3: "Find all primes p such that p^2 + 2 is prime.",
                5: "What is 13^13 mod 11?"}
    cands = [cand(i, p) for i, p in problems.items()] + [cand(4, None, status="unparsed")]
    a.script = {problems[1]: [ALL5], problems[2]: [rubric(difficulty=3)], problems[3]: [rubric(format=4)],
                problems[5]: ["```json\n" + ALL5 + "\n```\nHope this helps."]}
    b.script = {problems[1]: [rubric(correctness="4/5")], problems[2]: [ALL5], problems[3]: [rubric(solvability=1)],
                problems[5]: ["Format: 5\nCorrectness: 5\nDifficulty: 5\nConcept coverage: 5\nSolvability: 5"]}
    rd, recipe = make_run(tmp_path, a, b, cands, shards=2)

    run_stage(rd, recipe, "judge")
    scored = judge_records(rd)
    ok_ids = sorted(c.id for c in cands if c.status == "ok")
    assert set(scored) == {(c, j) for c in ok_ids for j in ("judge_a", "judge_b")}
    want_perfect = {(0, "a"): True, (0, "b"): True, (1, "a"): True, (1, "b"): False, (2, "a"): False,
                    (2, "b"): True, (3, "a"): False, (3, "b"): False, (5, "a"): True, (5, "b"): True}
    for (i, j), perfect in want_perfect.items():
        s = scored[(f"r000-q{i:05d}-s0", f"judge_{j}")]
        assert s.perfect is perfect and s.malformed is None, (i, j, s)
        assert s.status == ("repaired" if (i, j) == (5, "b") else "ok") and s.scale == 5
        assert s.raw == (a if j == "a" else b).script.get(problems[i], [ALL5])[0]
    assert scored[("r000-q00001-s0", "judge_b")].scores["correctness"] == 4
    assert scored[("r000-q00003-s0", "judge_b")].scores["solvability"] == 1

    # One HTTP answer per (candidate, judge): a parsed reply, perfect or not, is final;
    # the unparsed candidate reached neither server; each judge went to its own server.
    assert a.calls == b.calls == Counter({p: 1 for p in problems.values()})
    prompt = a.prompts[problems[0]]
    assert "modular arithmetic; primes" in prompt and "difficulty: 3 of 5" in prompt and "1 (bad) to 5" in prompt
    assert judge_marker_counts(rd, 2) == Counter({"judge_a.perfect": 3, "judge_a.imperfect": 2,
                                                  "judge_b.perfect": 3, "judge_b.imperfect": 2})

    run_stage(rd, recipe, "select")
    rs, kept, sel = selected(rd)
    assert set(kept) == {"r000-q00000-s0", "r000-q00005-s0"}
    assert {k: e.weight for k, e in rs.items()} == {c.id: 1.0 if c.id in kept else 0.0 for c in cands}
    assert rs["r000-q00001-s0"].weight_source == {"kind": "rejection_sampling", "kept": False,
                                                  "judges": {"judge_a": True, "judge_b": False}}
    assert rs["r000-q00004-s0"].weight_source["judges"] == {}  # never judged, weight 0
    assert sel["candidates"] == 6 and sel["parsed"] == 5 and sel["kept"] == 2
    assert sel["weight1"] == 2 and sel["weight0"] == 4 and sel["pass"] == {"judge_a": 3, "judge_b": 3}
    assert sel["malformed"] == {} and sel["pass_rate_all"] == pytest.approx(2 / 6)
    k0 = kept["r000-q00000-s0"]
    assert k0.problem == problems[0] and k0.round == 0 and k0.difficulty == 3
    assert [(s["judge"], s["status"], s["scores"]) for s in k0.judge_scores] == [
        ("judge_a", "ok", P5), ("judge_b", "ok", P5)]


# --------------------------------------------------------------------------- (c)


def test_malformed_replies_are_retried_then_recorded_and_counted(tmp_path, servers):
    """A reply the rubric parser cannot read is asked again (``max_parse_retries`` = 2:
    three tries); one that parses on a retry counts as that reply; one that never parses
    is a record with its malformed class, counted, and rejects the candidate. Nothing raises."""
    a, b = servers("a"), servers("b")
    P = {i: f"Let p be the {i}-th prime; find p mod {i + 3}." for i in range(8)}
    truncated = '{"format": 5, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvab'
    a.script = {P[0]: ["Sure, let me think about it.", ALL5],        # no_rubric, then perfect
                P[1]: [rubric(format=10)],                           # out_of_range, every time
                P[4]: ["[5, 5, 5, 5, 5]"],                           # wrong_type
                P[5]: [rubric(format="great")],                      # bad_value
                P[6]: ["", "", rubric(difficulty=2)]}                # empty twice, then parsed (imperfect)
    b.script = {P[2]: [""],                                          # empty, every time
                P[3]: [truncated],                                   # missing_fields (cut by max_tokens)
                P[7]: ["<p>Format: 5</p><p>Correctness: 5</p><p>Difficulty: 5</p>"
                       "<p>Concept coverage: 5</p><p>Solvability: 5</p>"]}  # repaired: final at once
    cands = [cand(i, p) for i, p in P.items()]
    rd, recipe = make_run(tmp_path, a, b, cands, retries=2)

    run_stage(rd, recipe, "judge")
    scored = judge_records(rd)
    assert len(scored) == 2 * len(P)

    def rec(i, j):
        return scored[(f"r000-q{i:05d}-s0", f"judge_{j}")]

    expect = {(1, "a"): "out_of_range", (4, "a"): "wrong_type", (5, "a"): "bad_value", (2, "b"): "empty",
              (3, "b"): "missing_fields"}
    for (i, j), cls in expect.items():
        s = rec(i, j)
        assert s.status == s.malformed == cls and s.perfect is False, (i, j, s)
        assert s.reason, "a malformed record says why"
    assert rec(1, "a").raw == rubric(format=10) and rec(3, "b").raw == truncated and rec(2, "b").raw == ""
    assert rec(0, "a").status == "ok" and rec(0, "a").perfect and rec(0, "a").raw == ALL5  # the retry's reply
    assert rec(6, "a").status == "ok" and not rec(6, "a").perfect and rec(6, "a").scores["difficulty"] == 2
    assert rec(7, "b").status == "repaired" and rec(7, "b").perfect and "html" in rec(7, "b").notes

    # Tries: 3 for a reply that never parses, until the first parsed one otherwise.
    assert a.calls == Counter({P[0]: 2, P[1]: 3, P[2]: 1, P[3]: 1, P[4]: 3, P[5]: 3, P[6]: 3, P[7]: 1})
    assert b.calls == Counter({P[0]: 1, P[1]: 1, P[2]: 3, P[3]: 3, P[4]: 1, P[5]: 1, P[6]: 1, P[7]: 1})
    assert judge_marker_counts(rd, 1) == Counter({
        "judge_a.perfect": 4, "judge_a.imperfect": 1, "judge_a.out_of_range": 1, "judge_a.wrong_type": 1,
        "judge_a.bad_value": 1, "judge_b.perfect": 6, "judge_b.empty": 1, "judge_b.missing_fields": 1})

    run_stage(rd, recipe, "select")
    rs, kept, sel = selected(rd)
    assert set(kept) == {"r000-q00000-s0", "r000-q00007-s0"}
    assert sum(e.weight for e in rs.values()) == 2 and len(rs) == len(P)
    assert sel["malformed"] == {"judge_a.out_of_range": 1, "judge_a.wrong_type": 1, "judge_a.bad_value": 1,
                                "judge_b.empty": 1, "judge_b.missing_fields": 1}
    assert sel["pass"] == {"judge_a": 4, "judge_b": 6} and sel["kept"] == 2 and sel["weight0"] == 6


def test_no_retries_records_the_first_malformed_reply(tmp_path, servers):
    """``max_parse_retries: 0``: one try; the malformed reply is the record."""
    a, b = servers("a"), servers("b")
    P = ["Compute the number of primes below 20.", "Find 7^7 mod 10."]
    a.script = {P[0]: ["no idea", ALL5]}
    rd, recipe = make_run(tmp_path, a, b, [cand(i, p) for i, p in enumerate(P)], retries=0)
    run_stage(rd, recipe, "judge")
    s = judge_records(rd)[("r000-q00000-s0", "judge_a")]
    assert s.malformed == "no_rubric" and s.raw == "no idea" and a.calls[P[0]] == 1
    run_stage(rd, recipe, "select")
    _, kept, sel = selected(rd)
    assert set(kept) == {"r000-q00001-s0"} and sel["malformed"] == {"judge_a.no_rubric": 1}


# --------------------------------------------------------------------------- (d)


def test_server_errors_transient_recovered_persistent_retried_on_rerun(tmp_path, servers):
    """judge_a's server answers the first request of every prompt with HTTP 500 (the
    client retries once and gets the reply); judge_b's server always answers 500. After
    the client's retries and the stage's tries every judge_b record is ``backend_failed``
    (no raw reply): that is no verdict, so the shard fails with a clear error instead of
    silently rejecting every candidate. Once the server is back, the rerun asks judge_b
    again for exactly those calls (judge_a is not asked again) and the candidates are kept."""
    from megatron_sz.errors import UserError

    a = servers("a", fail_first=1)
    b = servers("b", error_rate=1.0)
    P = [f"Find the sum of the first {n} primes." for n in (3, 4, 5)]
    rd, recipe = make_run(tmp_path, a, b, [cand(i, p) for i, p in enumerate(P)], retries=1,
                          backend_a={"max_retries": 1}, backend_b={"max_retries": 1})
    from megatron_sz.executor import execute_stage

    with pytest.raises(UserError, match=r"3 judge call\(s\) got no reply.*judge_b: 3"):
        execute_stage(rd, recipe, 0, "judge", progress=False)
    assert rd.read_marker(0, "judge", (0, 1)) is None          # the shard is not done
    scored = judge_records(rd)
    for i in range(len(P)):
        sa, sb = scored[(f"r000-q{i:05d}-s0", "judge_a")], scored[(f"r000-q{i:05d}-s0", "judge_b")]
        assert sa.perfect and sa.status == "ok" and sa.raw == ALL5
        assert sb.status == sb.malformed == "backend_failed" and not sb.perfect and sb.raw is None
        assert sb.reason and sb.scores == {}
    assert a.cfg.counts["500"] == len(P) and a.calls == Counter({p: 1 for p in P})
    # judge_b: (client max_retries + 1) x (max_parse_retries + 1) HTTP requests per candidate
    assert b.cfg.counts["500"] == b.cfg.counts["received"] == 2 * 2 * len(P) and not b.calls

    b.cfg.error_rate = 0.0                                     # the judge server is back
    run_stage(rd, recipe, "judge")
    scored = judge_records(rd)                                 # each (candidate, judge) once
    assert all(s.perfect for s in scored.values()) and len(scored) == 2 * len(P)
    assert a.calls == Counter({p: 1 for p in P}) and b.calls == Counter({p: 1 for p in P})
    assert judge_marker_counts(rd, 1) == Counter({"judge_a.perfect": 3, "judge_b.perfect": 3})
    run_stage(rd, recipe, "select")
    rs, kept, sel = selected(rd)
    assert len(kept) == len(P) and all(e.weight == 1.0 for e in rs.values())
    assert sel["pass"] == {"judge_a": 3, "judge_b": 3} and not sel["malformed"]


def test_judge_timeout_is_a_backend_failure(tmp_path, servers):
    """judge_b's server answers slower than the client's timeout: a ``backend_failed``
    record per candidate after every try and a clear error, never a hang. judge_a's client
    does not retry (``max_retries: 0``), so its first-request HTTP 500 is recovered by the
    stage's own next try. A faster server on the rerun completes the shard."""
    import time

    from megatron_sz.errors import UserError
    from megatron_sz.executor import execute_stage

    a = servers("a", fail_first=1)
    b = servers("b", delay_s=1.5)
    P = ["Find 3^5 mod 7.", "Find 5^3 mod 11."]
    rd, recipe = make_run(tmp_path, a, b, [cand(i, p) for i, p in enumerate(P)], retries=1,
                          backend_b={"timeout_s": 0.3})
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"2 judge call\(s\) got no reply"):
        execute_stage(rd, recipe, 0, "judge", progress=False)
    assert time.monotonic() - t0 < 10
    scored = judge_records(rd)
    assert all(scored[(f"r000-q{i:05d}-s0", "judge_a")].perfect for i in range(len(P)))
    assert a.cfg.counts["500"] == len(P) and a.calls == Counter({p: 1 for p in P})
    assert {scored[(f"r000-q{i:05d}-s0", "judge_b")].malformed for i in range(len(P))} == {"backend_failed"}
    assert b.cfg.counts["received"] == 2 * len(P)  # one client attempt per stage try
    b.cfg.delay_s = 0.0
    run_stage(rd, recipe, "judge")
    assert judge_marker_counts(rd, 1) == Counter({"judge_a.perfect": 2, "judge_b.perfect": 2})
    run_stage(rd, recipe, "select")
    _, kept, sel = selected(rd)
    assert len(kept) == 2 and not sel["malformed"]


# --------------------------------------------------------------------------- resume


def test_rerun_asks_only_what_is_missing(tmp_path, servers):
    """A judge shard killed mid-write (some records on disk, a partial last line): the
    rerun asks each judge only for the candidates it has no record of, and every
    (candidate, judge) pair ends up scored exactly once."""
    from megatron_sz.round import _tag
    from megatron_sz.systems.promptcot_rubric import judge_score, parse_rubric

    a, b = servers("a"), servers("b")
    P = [f"How many divisors does {n} have?" for n in (12, 30, 36, 48)]
    cands = [cand(i, p) for i, p in enumerate(P)]
    rd, recipe = make_run(tmp_path, a, b, cands)
    shard = rd.round_dir(0) / "judge" / f"shard-{_tag(0, 1)}.jsonl"
    write_jsonl(shard, [judge_score(cands[0].id, "judge_a", parse_rubric(ALL5), 5, raw=ALL5),
                        judge_score(cands[1].id, "judge_a", parse_rubric(rubric(format=3)), 5, raw="x"),
                        judge_score(cands[0].id, "judge_b", parse_rubric(ALL5), 5, raw=ALL5)])
    with shard.open("a") as fh:
        fh.write('{"candidate_id": "r000-q00002-s0", "judge": "judge_a", "sco')  # killed mid-line
    run_stage(rd, recipe, "judge")
    scored = judge_records(rd)
    assert set(scored) == {(c.id, j) for c in cands for j in ("judge_a", "judge_b")}
    assert a.calls == Counter({P[2]: 1, P[3]: 1}) and b.calls == Counter({P[1]: 1, P[2]: 1, P[3]: 1})
    assert judge_marker_counts(rd, 1) == Counter({"judge_a.perfect": 3, "judge_a.imperfect": 1,
                                                  "judge_b.perfect": 4})
    run_stage(rd, recipe, "select")
    _, kept, sel = selected(rd)
    assert set(kept) == {cands[i].id for i in (0, 2, 3)} and sel["kept"] == 3


@pytest.mark.parametrize("sample_shards,judge_shards", [(1, 2), (3, 2)])
def test_uncorrelated_shards_judge_each_candidate_once(tmp_path, servers, sample_shards, judge_shards):
    """Judge shards that do not match the sample shards one to one split the candidates
    between them: every candidate is asked of each judge once, in exactly one shard."""
    a, b = servers("a"), servers("b")
    P = [f"Find the {n}-th triangular number mod 9." for n in range(5, 12)]
    cands = [cand(i, p) for i, p in enumerate(P)]
    rd, recipe = make_run(tmp_path, a, b, cands, shards=sample_shards, judge_shards=judge_shards)
    run_stage(rd, recipe, "judge")
    scored = judge_records(rd)  # no pair twice, over all the judge shard files
    assert set(scored) == {(c.id, j) for c in cands for j in ("judge_a", "judge_b")}
    assert a.calls == b.calls == Counter({p: 1 for p in P})
    assert judge_marker_counts(rd, judge_shards) == Counter({"judge_a.perfect": len(P), "judge_b.perfect": len(P)})
    run_stage(rd, recipe, "select")
    _, kept, sel = selected(rd)
    assert len(kept) == len(P) and sel["pass"] == {"judge_a": len(P), "judge_b": len(P)}
    assert all(len(k.judge_scores) == 2 for k in kept.values())
