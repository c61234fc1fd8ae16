"""Agent0's signals against hand-computed cases: voting (with ties), p, filter, rewards, BLEU clusters."""
from __future__ import annotations

import math

import pytest

from megatron_sz.systems import agent0_signals as A


def test_majority_vote_and_p():
    label, p, votes = A.majority_vote(["3", "3", "4", None, " 3 ", "5"])
    assert (label, votes) == ("3", {"3": 3, "4": 1, "5": 1})
    assert p == pytest.approx(3 / 6)  # samples without an answer stay in the denominator
    assert A.majority_vote([None, None]) == (None, 0.0, {})
    assert A.majority_vote([]) == (None, 0.0, {})


def test_majority_vote_ties_go_to_the_first_to_reach_the_count():
    # 4 reaches 1 first, then 3 reaches 1 (tie, 4 keeps it); 3 reaches 2 first -> 3
    assert A.majority_vote(["4", "3", "3", "4"])[:2] == ("3", 0.5)
    assert A.majority_vote(["7", "8"])[:2] == ("7", 0.5)
    assert A.majority_vote(["8", "7"])[:2] == ("8", 0.5)
    # equivalent spellings vote together
    assert A.majority_vote(["$12$", "12", "1 2", "13"])[:2] == ("12", 0.75)


def test_uncertainty_and_tool_reward_and_filter():
    for p, r in [(0.5, 1.0), (0.0, 0.0), (1.0, 0.0), (0.3, 0.6), (0.8, 0.4), (0.625, 0.75)]:
        assert A.uncertainty_reward(p) == pytest.approx(r)
    assert A.tool_reward(0) == 0 and A.tool_reward(2) == pytest.approx(0.10)
    assert A.tool_reward(4) == pytest.approx(0.20) and A.tool_reward(9) == pytest.approx(0.20)
    assert A.tool_reward(1.5) == pytest.approx(0.075)
    assert [A.keep(p, 0.3, 0.8) for p in (0.2999, 0.3, 0.5, 0.8, 0.8001, None)] == \
        [False, True, True, True, False, False]


def test_curriculum_reward():
    r, unc, tool = A.curriculum_reward(valid=True, p=0.6, tool_calls=2, repetition=0.25)
    assert (unc, tool) == (pytest.approx(0.8), pytest.approx(0.1))
    assert r == pytest.approx(0.8 + 0.1 - 0.25)
    assert A.curriculum_reward(valid=False, p=0.5, tool_calls=4, repetition=0.0) == (-1.0, 0.0, 0.0)
    r, _, _ = A.curriculum_reward(valid=True, p=None, tool_calls=0, repetition=0.5)
    assert r == pytest.approx(-0.5)


def _bleu(hyp: str, ref: str) -> float:
    """Sentence BLEU by hand (13a tokenisation splits the final '.'; effective order: n-gram
    orders longer than the hypothesis are left out; no smoothing needed when all match)."""
    from collections import Counter

    def toks(s):
        return s.replace(".", " .").replace("?", " ?").split()

    h, r = toks(hyp), toks(ref)
    logs = []
    for n in range(1, 5):
        hn = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rn = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        if not hn:
            continue
        match = sum(min(c, rn[g]) for g, c in hn.items())
        if match == 0:
            return 0.0
        logs.append(math.log(match / sum(hn.values())))
    bp = 1.0 if len(h) > len(r) else math.exp(1 - len(r) / len(h))
    return 100 * bp * math.exp(sum(logs) / len(logs))


def test_bleu_distance_matches_a_hand_computation():
    qs = ["Compute 7 + 8 + 9.", "Compute 7 + 8 + 1.", "What is the sum of the primes below ten?"]
    d = A.bleu_distance_matrix(qs)
    # tokens: Compute 7 + 8 + 9 . vs Compute 7 + 8 + 1 . : 1-grams 6/7... computed by hand
    want = 1 - (_bleu(qs[0], qs[1]) + _bleu(qs[1], qs[0])) / 200
    assert d[0][1] == pytest.approx(want, abs=1e-9) and d[1][0] == d[0][1]
    assert d[0][2] == pytest.approx(1.0)  # nothing in common
    assert d[0][0] == 0.0


def test_bleu_clusters_and_penalty():
    qs = ["Compute 7 + 8 + 9 + 4.", "Compute 7 + 8 + 9 + 5.",   # near copies
          "Compute 7 + 8 + 9 + 6.",                            # joins them
          "How many ways can 5 people sit in a row?",
          "Find the remainder of 2 ** 10 divided by 7."]
    cl = A.bleu_clusters(qs, threshold=0.5)
    assert cl == [0, 0, 0, 1, 2]
    assert A.repetition_penalties(cl) == pytest.approx([3 / 5, 3 / 5, 3 / 5, 1 / 5, 1 / 5])
    # a strict threshold separates everything; a loose one (1.0) joins all pairs that share anything
    assert A.bleu_clusters(qs, threshold=1e-9) == [0, 1, 2, 3, 4]
    assert A.repetition_penalties([]) == []


def test_single_linkage_chains():
    """a~b and b~c but not a~c: one cluster by single linkage."""
    a = "Compute 1 + 2 + 3 + 4 + 5 + 6."
    b = "Compute 1 + 2 + 3 + 4 + 9 + 9."
    c = "Compute 7 + 7 + 3 + 4 + 9 + 9."
    d = A.bleu_distance_matrix([a, b, c])
    thr = max(d[0][1], d[1][2]) + 1e-6
    assert d[0][2] >= thr  # a and c are not close on their own
    assert A.bleu_clusters([a, b, c], threshold=thr) == [0, 0, 0]


def test_parse_question():
    assert A.parse_question(" Compute 7 + 8.\nmore") == ("Compute 7 + 8.", None)
    assert A.parse_question("") == (None, "empty")
    assert A.parse_question("Compute seven.") == (None, "nothing_to_compute")
    assert A.parse_question("7") == (None, "too_short")
    assert A.parse_question("Compute \\boxed{3} 4") == (None, "holds_code_or_answer")
    assert A.parse_question("Compute " + "1 " * 300, max_chars=100) == (None, "too_long")
