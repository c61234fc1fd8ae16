"""mean@k and pass@k against hand-computed cases and an independent binomial computation."""
import math
import random

import pytest

from megatron_sz.evaluation.metrics import macro_average, mean_at_k, pass_at_k, score_samples


def _binomial(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0),
    (4, 0, 2, 0.0), (4, 4, 2, 1.0),
    (4, 1, 1, 0.25), (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, 0.9),                            # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (8, 3, 8, 1.0), (8, 0, 8, 0.0),
    (32, 1, 1, 1 / 32),
])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_on_random_cases(rng_seed):
    rng = random.Random(rng_seed)
    for _ in range(300):
        n = rng.randint(1, 64)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(_binomial(n, c, k), rel=1e-9, abs=1e-12)


def test_pass_at_k_refuses_n_below_k():
    with pytest.raises(ValueError, match="needs at least 4 samples"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_mean_at_k_is_per_sample_accuracy_not_pass_at_k():
    assert mean_at_k([True, False, False, False]) == 0.25
    assert pass_at_k(4, 1, 4) == 1.0  # the upstream "mean@k" bug would report this


def test_score_samples_aggregates_and_reports_missing_pass_at_k(rng_seed):
    rng = random.Random(rng_seed)
    samples, per_problem = [], []
    for p in range(7):
        n = 4 if p else 2  # one problem has fewer samples: n < k for pass@4
        flags = [rng.random() < 0.4 for _ in range(n)]
        per_problem.append(flags)
        for j, f in enumerate(flags):
            samples.append({"problem_id": f"q{p}", "correct": f, "verifier": "rule" if j % 3 else "judge",
                            "extracted_answer": None if (p, j) == (1, 1) else "1"})
    score = score_samples(samples, benchmark="b", ks=[1, 2, 4])
    assert score.problems == 7 and score.samples == len(samples) and score.k == 2
    assert score.mean_at_k == pytest.approx(sum(sum(f) / len(f) for f in per_problem) / 7)
    assert score.pass_at_k[1] == pytest.approx(sum(sum(f) / len(f) for f in per_problem) / 7)
    assert score.pass_at_k[2] == pytest.approx(sum(_binomial(len(f), sum(f), 2) for f in per_problem) / 7)
    assert score.pass_at_k[4] is None and "n >= 4" in score.pass_at_k_note[4]
    assert score.unparseable_rate == pytest.approx(1 / len(samples))
    assert sum(score.decided_by.values()) == pytest.approx(1.0)
    macro = macro_average([score, score])
    assert macro["mean_at_k"] == pytest.approx(score.mean_at_k) and macro["pass_at_4"] is None
