"""Teacher reply parsing against a corpus of malformed replies: each is classified, none crashes."""
from __future__ import annotations

import json
import random
import string

import pytest

from megatron_sz.teacher.parsing import STATUSES, parse_json_reply, parse_judge_reply

GOOD = {"enhanced_question": "Compute 12 + 30.", "solution": "12 + 30 = 42. \\boxed{42}", "answer": "42"}
J = json.dumps(GOOD)

# (reply, expected status, notes that must be present, expected answer or None)
CORPUS = [
    (J, "ok", [], "42"),
    ("```json\n" + J + "\n```", "ok", ["fenced"], "42"),
    ("```\n" + J + "\n```\nLet me know if you need more.", "ok", ["fenced"], "42"),
    ("Here is the new problem:\n" + J, "ok", ["leading_text"], "42"),
    (J + "\n\nThis problem is harder because it adds a carry.", "ok", ["trailing_text"], "42"),
    (J[:-1] + ', "difficulty": "medium"', "repaired", ["truncated"], "42"),
    (J[:-12], "repaired", ["truncated", "answer_from_solution"], "42"),  # answer key cut: taken from \boxed
    (J[:J.index("= 42")], "missing_fields", ["truncated"], None),  # cut inside the solution
    ("```json\n" + J[:-1], "repaired", ["fenced", "unclosed_fence", "truncated"], "42"),
    ("{'enhanced_question': 'Compute 12 + 30.', 'solution': 'So \\\\boxed{42}', 'answer': '42'}",
     "repaired", ["single_quotes"], "42"),
    ('{"enhanced_question": "Q", "solution": "S", "answer": 42, "valid": True}', "repaired",
     ["python_literals"], "42"),
    ('{enhanced_question: "Q", solution: "S", answer: "7",}', "repaired", ["unquoted_keys", "trailing_commas"], "7"),
    ('{"enhanced_question": "Find \\frac{1}{2} of 8.", "solution": "\\frac{8}{2} = 4, \\boxed{4}", "answer": "4"}',
     "repaired", ["latex_escapes"], "4"),
    ('{"enhanced_question": "Find \\sqrt{16}.", "solution": "\\sqrt{16} = 4", "answer": "4"}',
     "repaired", ["invalid_escapes"], "4"),
    ('{"enhanced_question": "Q", "solution": "S \\\\boxed{9}"}', "repaired", ["answer_from_solution"], "9"),
    ('{"enhanced_question": "Q", "solution": "S"}', "missing_fields", [], None),
    ('{"enhanced_question": "", "solution": "S", "answer": "1"}', "missing_fields", [], "1"),
    ('{"question": "Q", "reference_solution": "S", "final_answer": "5"}', "ok", ["aliased_keys"], "5"),
    ('{"result": ' + J + "}", "ok", ["nested"], "42"),
    ('{"enhanced_question": "Say "hi" twice", "solution": "S", "answer": "2"}', "repaired",
     ["unescaped_quotes"], "2"),
    ('{"enhanced_question": "Q", "solution": "line one\nline two", "answer": "3"}', "repaired",
     ["invalid_escapes"], "3"),
    ("[1, 2, 3]", "wrong_type", [], None),
    ('"just a string"', "wrong_type", [], None),
    ("```json\n[{\"a\": 1}]\n```", "missing_fields", ["fenced"], None),
    ("I'm sorry, I can't help with that.", "not_json", [], None),
    ("The new problem is: compute 3 + 4. Answer: 7", "not_json", [], None),
    ("{", "missing_fields", ["truncated"], None),
    ("{{{{", "missing_fields", ["truncated"], None),
    ("", "empty", [], None),
    ("   \n\t ", "empty", [], None),
    (None, "empty", [], None),
    ("```json\n```", "not_json", [], None),
    ('First try: {"enhanced_question": "Q"} and the fixed one: ' + J, "ok", ["leading_text"], "42"),
]


@pytest.mark.parametrize("reply,status,notes,answer", CORPUS, ids=[f"c{i}" for i in range(len(CORPUS))])
def test_corpus_classified(reply, status, notes, answer):
    p = parse_json_reply(reply)
    assert p.status == status, (p.status, p.notes, p.error)
    assert set(notes) <= set(p.notes), p.notes
    if answer is not None:
        assert p.data["answer"] == answer
    if p.ok:
        assert all(isinstance(p.data[k], str) and p.data[k] for k in GOOD)
    else:
        assert p.error  # a failure always says why
    assert p.raw == reply


def test_latex_survives_json():
    p = parse_json_reply('{"enhanced_question": "Compute \\binom{5}{2} \\times 3.", "solution": '
                         '"\\binom{5}{2} = 10, 10 \\times 3 = 30. \\boxed{30}", "answer": "30"}')
    assert p.ok and p.data["enhanced_question"] == "Compute \\binom{5}{2} \\times 3."
    assert "\\boxed{30}" in p.data["solution"]


def test_random_garbage_never_crashes(rng_seed):
    rng = random.Random(rng_seed)
    alphabet = string.printable + "{}[]\"'\\:,"
    for _ in range(300):
        base = J if rng.random() < 0.5 else ""
        chars = list(base)
        for _ in range(rng.randint(1, 12)):  # random edits of a good reply, or pure noise
            pos = rng.randint(0, len(chars))
            if chars and rng.random() < 0.5:
                del chars[min(pos, len(chars) - 1)]
            else:
                chars.insert(pos, rng.choice(alphabet))
        text = "".join(chars[:rng.randint(0, len(chars))]) if rng.random() < 0.3 else "".join(chars)
        p = parse_json_reply(text)
        assert p.status in STATUSES
        if p.ok:
            assert all(isinstance(p.data[k], str) and p.data[k].strip() for k in GOOD)
        j = parse_judge_reply(text)
        assert j.verdict in (True, False, None)


@pytest.mark.parametrize("reply,verdict", [
    ('{"correct": true, "reason": "same value"}', True),
    ('```json\n{"correct": false}\n```', False),
    ("{'correct': 'yes'}", True),
    ('{"verdict": "incorrect"}', False),
    ("After checking, the answer is CORRECT.", True),
    ("The student's answer is not correct.", False),
    ("It is correct... no wait, it is incorrect.", False),
    ("\\boxed{correct}", True),
    ("hmm, let me think", None),
    ("", None),
])
def test_judge_replies(reply, verdict):
    assert parse_judge_reply(reply).verdict is verdict
