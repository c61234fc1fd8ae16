"""PromptCoT judging without a model: the rubric parser on odd judge replies, the
two-judge agreement rule, the {0, 1} weighting, and the symbolic judge against the
symbolic teacher's own problems (the tiny recipe's judges)."""
from __future__ import annotations

import json

import pytest

from megatron_sz.data import CandidateProblem, JudgeScore, RUBRIC_CRITERIA
from megatron_sz.systems.promptcot import parse_generation, weigh_candidates
from megatron_sz.systems.promptcot_rubric import (all_perfect, judge_score, parse_concepts_reply,
                                                  parse_rationale_reply, parse_rubric, symbolic_judgement,
                                                  symbolic_solution)

P5 = dict(format=5, correctness=5, difficulty=5, concept_coverage=5, solvability=5)
ALL5 = json.dumps(P5)

# (reply, expected status, expected perfect, expected scores or None to skip the check)
CORPUS = [
    (ALL5, "ok", True, P5),
    ("```json\n" + ALL5 + "\n```", "ok", True, P5),
    ("Here is my evaluation.\n```\n" + ALL5 + "\n```\nLet me know if you need more.", "ok", True, P5),
    ("After careful thought: " + ALL5 + " That is my final rubric.", "ok", True, P5),
    ('{"format": 5, "correctness": 4, "difficulty": 5, "concept_coverage": 5, "solvability": 5}', "ok", False,
     dict(P5, correctness=4)),
    ('{"format": 5, "correctness": 5, "difficulty": 5, "concept_coverage": 5}', "missing_fields", False, None),
    ('{"Format": "five", "Correctness": "Five", "Difficulty": "5/5", "Concept Coverage": "perfect", '
     '"Solvability": "excellent"}', "ok", True, P5),
    ('{"format": 10, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}',
     "out_of_range", False, None),
    ('{"format": -1, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}',
     "out_of_range", False, None),
    ('{"format": "10/10", "correctness": "10/10", "difficulty": "8/10", "concept_coverage": "10/10", '
     '"solvability": "10/10"}', "ok", False, dict(P5, difficulty=4.2)),
    ("", "empty", False, None),
    ("   \n\t ", "empty", False, None),
    (None, "empty", False, None),
    ("<html><body><p>Format: 5</p><p>Correctness: 5</p><p>Difficulty: 5</p><p>Concept coverage: 5</p>"
     "<p>Solvability: 5</p></body></html>", "repaired", True, P5),
    ('<div>{"format": 5, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}</div>',
     "repaired", True, P5),
    ('{"format": 5, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvab', "missing_fields", False,
     None),  # truncated by max_tokens
    ('{"format": 5, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5', "repaired", True,
     P5),  # truncated before the closing brace only
    ("Format: 5\nCorrectness: 5\nDifficulty: 5\nConcept coverage: 5\nSolvability: 5\nOverall: perfect.",
     "repaired", True, P5),
    ("**Format**: 5/5\n**Correctness**: 5/5\n**Difficulty**: 4/5\n**Concept Coverage**: 5/5\n"
     "**Solvability**: 5/5", "repaired", False, dict(P5, difficulty=4)),
    ("| criterion | score |\n|---|---|\n| format | 5 |\n| correctness | 5 |\n| difficulty | 5 |\n"
     "| concept coverage | 5 |\n| solvability | 5 |", "repaired", True, P5),
    ('{"scores": {"format": 5, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}, '
     '"reason": "fine"}', "ok", True, P5),
    ('{"rubric": [{"criterion": "format", "score": 5}, {"criterion": "correctness", "score": 5}, '
     '{"criterion": "difficulty", "score": 5}, {"criterion": "concept coverage", "score": 5}, '
     '{"criterion": "solvability", "score": 5}]}', "ok", True, P5),
    ('{"format": {"score": 5, "why": "clear"}, "correctness": {"score": 5}, "difficulty": {"score": 3}, '
     '"concept_coverage": {"score": 5}, "solvability": {"score": 5}}', "ok", False, dict(P5, difficulty=3)),
    ("{'format': 5, 'correctness': 5, 'difficulty': 5, 'concept_coverage': 5, 'solvability': 5,}", "repaired",
     True, P5),  # single quotes + trailing comma
    ('{"format": "N/A", "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}',
     "bad_value", False, None),
    ('{"format": "good", "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}',
     "bad_value", False, None),
    ('{"format": true, "correctness": true, "difficulty": 5, "concept_coverage": 5, "solvability": true}', "ok",
     True, P5),
    ('{"format": 5, "correctness": false, "difficulty": 5, "concept_coverage": 5, "solvability": 5}', "ok",
     False, dict(P5, correctness=1)),
    ('{"format": NaN, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}',
     "out_of_range", False, None),
    ("The problem is perfect in every respect.", "no_rubric", False, None),
    ("[5, 5, 5, 5, 5]", "wrong_type", False, None),
    ('"all five"', "wrong_type", False, None),
    ("I cannot evaluate this problem.", "no_rubric", False, None),
    ('{"format": 4.5, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": 5}', "ok", False,
     dict(P5, format=4.5)),
    ("Format: 5\nCorrectness: 5\nDifficulty: 2\nConcept coverage: 5\nSolvability: 5\n"
     "Correction:\nDifficulty: 5", "repaired", True, P5),  # the last mention wins
    ('{"format": 5, "correctness": 5, "difficulty": 5, "coverage": 5, "solvable": 5}', "ok", True, P5),
    ('{"format": "5 - clear", "correctness": "5 (no errors)", "difficulty": "5.", "concept_coverage": "5",'
     ' "solvability": "5"}', "ok", True, P5),
    ('{"format": 5, "correctness": 5, "difficulty": 5, "concept_coverage": 5, "solvability": "0/5"}',
     "out_of_range", False, None),
    ("Sure!\n\n```json\n{\"format\": 5, \"correctness\": 5, \"difficulty\": 5, \"concept_coverage\": 5, "
     "\"solvability\": 5}", "repaired", True, P5),  # unclosed fence
    ("\u200b\u200b", "no_rubric", False, None),  # zero-width spaces only
    ("\x00", "no_rubric", False, None),
]


@pytest.mark.parametrize("reply,status,perfect,scores", CORPUS, ids=[f"reply{i}" for i in range(len(CORPUS))])
def test_rubric_parser_on_odd_replies(reply, status, perfect, scores):
    rr = parse_rubric(reply, 5)
    assert rr.status == status, (reply, rr)
    assert rr.perfect(5) is perfect
    if scores is not None:
        assert rr.scores == pytest.approx({k: float(v) for k, v in scores.items()})
    s = judge_score("c1", "judge_a", rr, 5, raw=reply)
    s.validate()  # a malformed reply is a valid record, never perfect
    assert (s.malformed is None) == (status in ("ok", "repaired"))


def test_corpus_is_big_and_varied():
    assert len(CORPUS) >= 25
    assert len({c[1] for c in CORPUS}) >= 7  # every malformed class appears


def test_rubric_parser_never_raises_on_garbage(rng_seed):
    import random

    rng = random.Random(rng_seed)
    alphabet = '{}[]":,5 abcformatdifficulty\n`<>/\\'
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        rr = parse_rubric(text, 5)
        assert rr.status in ("ok", "repaired", "empty", "no_rubric", "missing_fields", "bad_value",
                             "out_of_range", "wrong_type")


def _score(judge, perfect=True, malformed=None):
    rr = parse_rubric(ALL5 if perfect else json.dumps(dict(P5, difficulty=2)), 5)
    s = judge_score("c", judge, rr, 5, raw=None)
    if malformed:
        s.status, s.malformed, s.perfect = malformed, malformed, False
    return s


def test_two_judge_rule():
    judges = ["judge_a", "judge_b"]
    assert all_perfect([_score("judge_a"), _score("judge_b")], judges)
    assert not all_perfect([_score("judge_a"), _score("judge_b", perfect=False)], judges)
    assert not all_perfect([_score("judge_a", perfect=False), _score("judge_b")], judges)
    assert not all_perfect([_score("judge_a")], judges)  # judge_b never scored it
    assert not all_perfect([_score("judge_a"), _score("judge_b", malformed="no_rubric")], judges)
    assert not all_perfect([], judges)
    assert not all_perfect([_score("judge_a"), _score("judge_a")], judges)  # the same judge twice is not two
    assert all_perfect([_score("judge_a"), _score("judge_b"), _score("judge_c", perfect=False)], judges)


def test_weights_are_one_for_kept_and_zero_for_the_rest():
    def cand(i, problem="Compute 3 + 4.", status="ok", text=None):
        return CandidateProblem(id=f"r000-q{i:05d}-s0", round=0, request_id=f"r000-q{i:05d}", prompt="Concepts: add\n",
                                text=text if text is not None else f" add.\nProblem: {problem}", concepts=["add"],
                                difficulty=1, problem=problem if status == "ok" else None, status=status)

    def sc(c, judge, perfect):
        s = _score(judge, perfect)
        s.candidate_id = c.id
        return s

    cs = [cand(0), cand(1), cand(2), cand(3, status="unparsed", text=" add two"), cand(4, status="empty", text="")]
    scores = [sc(cs[0], "judge_a", True), sc(cs[0], "judge_b", True),  # kept
              sc(cs[1], "judge_a", True), sc(cs[1], "judge_b", False),  # one judge disagrees
              sc(cs[2], "judge_a", True)]  # judge_b missing
    examples, kept, stats = weigh_candidates(cs, scores, ["judge_a", "judge_b"], round=0)
    assert [(e.problem_id[-9:], e.weight) for e in examples] == [
        ("q00000-s0", 1.0), ("q00001-s0", 0.0), ("q00002-s0", 0.0), ("q00003-s0", 0.0)]  # empty text: no example
    assert [k.candidate_id for k in kept] == [cs[0].id]
    assert kept[0].judge_scores and {j["judge"] for j in kept[0].judge_scores} == {"judge_a", "judge_b"}
    assert stats["kept"] == 1 and stats["pass"] == {"judge_a": 3, "judge_b": 1}
    assert stats["pass_rate_all"] == pytest.approx(1 / 5)
    assert all(e.target.strip() for e in examples)


def test_generation_parsing():
    assert parse_generation(" add two numbers.\nProblem: Compute 3 + 4.") == ("add two numbers.", "Compute 3 + 4.")
    assert parse_generation(" add two numbers.") == ("add two numbers.", None)
    assert parse_generation("") == (None, None)
    assert parse_generation("x\nProblem: Compute 1 + 2.\nConcepts: mod") == ("x", "Compute 1 + 2.")


def test_concept_and_rationale_replies():
    st, cs, d, _ = parse_concepts_reply('```json\n{"concepts": ["modular arithmetic", "powers"], "difficulty": 4}'
                                        '\n```', 5)
    assert (st, cs, d) == ("ok", ["modular arithmetic", "powers"], 4)
    st, cs, d, _ = parse_concepts_reply("Concepts:\n- primes\n- divisibility\nDifficulty: hard", 5)
    assert st == "repaired" and cs == ["primes", "divisibility"]
    assert parse_concepts_reply("", 5)[0] == "parse_failed"
    assert parse_concepts_reply('{"concepts": "a, b, c, d, e, f", "difficulty": "three"}', 3)[1:3] == (
        ["a", "b", "c"], 3)
    assert parse_rationale_reply('{"rationale": "combine primes with parity"}')[:2] == (
        "ok", "combine primes with parity")
    assert parse_rationale_reply("Rationale: start from the concept of parity and ask for a count.")[0] == "repaired"
    assert parse_rationale_reply(None)[0] == "parse_failed"


def test_symbolic_judge_accepts_the_teachers_problems_and_rejects_the_wrong_concept_or_level():
    from megatron_sz.teacher.symbolic import FAMILIES, SymbolicTeacher

    teacher = SymbolicTeacher(seed=3)
    for fam in FAMILIES:
        for d in range(1, 6):
            for p in teacher.sample_problems(4, seed=d, difficulty=d, families=[fam]):
                reply, det = symbolic_judgement(p.problem, [fam], d)
                assert parse_rubric(reply).perfect(5), (p.problem, reply)
                assert det["family"] == fam and d in det["levels"]
                assert symbolic_solution(p.problem) == (p.answer, p.solution)
                other = next(f for f in FAMILIES if f != fam)
                assert not parse_rubric(symbolic_judgement(p.problem, [other], d)[0]).perfect(5)
    s = json.loads(symbolic_judgement("Compute 33 + 4.", ["add"], 1)[0])
    assert s["difficulty"] == 1 and s["concept_coverage"] == 5  # 2-digit + 1-digit is no add level
    assert json.loads(symbolic_judgement("Compute 42 mod 0.", ["mod"], 1)[0])["solvability"] == 1
    assert json.loads(symbolic_judgement("Compute 3 +", ["add"], 1)[0])["format"] == 1
    big = "Compute " + "9" * 40 + "!."
    assert json.loads(symbolic_judgement(big, ["comb"], 1)[0])["solvability"] == 1  # no factorial of 10^40
    assert all(c in RUBRIC_CRITERIA for c in json.loads(symbolic_judgement("Compute 2 * 3.", ["mul"], 1)[0])
               if c != "reason")


def test_judge_score_record_roundtrip():
    from megatron_sz.data import read_jsonl, write_jsonl

    s = judge_score("c9", "judge_b", parse_rubric("Format: 5", 5), 5, raw="Format: 5")
    assert s.malformed == "missing_fields" and not s.perfect
    bad = JudgeScore(candidate_id="c", judge="j", status="no_rubric", perfect=True, malformed="no_rubric")
    with pytest.raises(ValueError):
        bad.validate()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_jsonl(Path(d) / "s.jsonl", [s])
        (back,) = read_jsonl(Path(d) / "s.jsonl", JudgeScore)
    assert back.scores == s.scores and back.malformed == "missing_fields"
