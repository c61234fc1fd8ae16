"""Advantage estimators: GRPO (with/without std), REINFORCE++, TRR++ baselines, ADPO."""
import math

import pytest
import torch

from megatron_sz.train import advantages as A


def test_grpo_group_normalised_with_and_without_std():
    r = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 3.0, 1.0]
    g = ["a", "a", "a", "a", "b", "b", "c", "c"]
    adv = A.grpo_advantages(r, g)
    # group a: mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert adv[:4].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-5)
    assert adv[4:6].tolist() == [0.0, 0.0]                     # all equal: no signal
    assert adv[6:].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-5)
    raw = A.grpo_advantages(r, g, normalize_std=False)
    assert raw.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 1, -1])
    assert A.grpo_advantages([3.0], ["x"]).tolist() == [0.0]   # singleton group


def test_reinforce_pp_normalises_over_the_batch():
    r = torch.tensor([2.0, 4.0, 6.0, 0.0])
    adv = A.reinforce_pp_advantages(r)
    assert float(adv.mean()) == pytest.approx(0, abs=1e-6)
    assert float(adv.std()) == pytest.approx(1, rel=1e-5)
    assert adv.argmax() == 2 and adv.argmin() == 3


def test_trr_pp_keeps_separate_baselines_per_task_and_role():
    tasks = ["deduction", "abduction", "induction"]
    roles = ["propose", "solve"]
    torch.manual_seed(0)
    rs, tt, rr, expect = [], [], [], {}
    for i, t in enumerate(tasks):
        for j, ro in enumerate(roles):
            base = 10.0 * i + 100.0 * j                  # very different baselines per key
            vals = [base + d for d in (0.0, 1.0, 2.0, 5.0)]
            rs += vals
            tt += [t] * 4
            rr += [ro] * 4
            m = sum(vals) / 4
            sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 3)
            expect[(t, ro)] = (m, sd)
    adv, stats = A.trr_pp_advantages(rs, tt, rr)
    assert len(stats) == 6
    for key, (m, sd) in expect.items():
        assert stats[key][0] == pytest.approx(m) and stats[key][1] == pytest.approx(sd)
    # every key's advantages are the same standardised pattern: the offsets vanish
    pattern = adv[:4]
    for k in range(6):
        assert adv[4 * k:4 * k + 4].tolist() == pytest.approx(pattern.tolist(), rel=1e-5)
    # one shared baseline (REINFORCE++) would NOT remove them
    shared = A.reinforce_pp_advantages(rs)
    assert not torch.allclose(shared[:4], shared[20:24])


@pytest.mark.parametrize("p,scale,high", [
    (0.0, 0.5, 0.2 + 0.1),            # clip((0-0.3)/0.5)=0 -> s=m; clip((0.8-0)/0.5)=1
    (0.3, 0.5, 0.2 + 0.1),            # s=m; (0.8-0.3)/0.5 = 1
    (0.55, 0.5 + 0.5 * 0.5, 0.2 + 0.1 * 0.5),   # (0.25/0.5)=0.5 both
    (0.8, 1.0, 0.2),                  # (0.5/0.5)=1 -> s=1; (0)/0.5 -> eps
    (1.0, 1.0, 0.2),                  # clipped at 1 and 0
])
def test_adpo_scale_and_clip_follow_the_formulas(p, scale, high):
    assert float(A.adpo_scale(p, 0.5)) == pytest.approx(scale, abs=1e-6)
    assert float(A.adpo_clip_high(p, 0.2)) == pytest.approx(high, abs=1e-6)


def test_adpo_advantages_scale_grpo_and_dispatch():
    r = [1.0, 0.0, 1.0, 0.0]
    g = [0, 0, 1, 1]
    p = [0.3, 0.3, 0.8, 0.8]
    adv = A.compute_advantages("adpo", r, group_ids=g, consistency=p, adpo_min_scale=0.2)
    base = A.grpo_advantages(r, g)
    assert adv.tolist() == pytest.approx((base * torch.tensor([0.2, 0.2, 1, 1])).tolist(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        A.compute_advantages("ppo", r)
    with pytest.raises(ValueError, match="needs group ids"):
        A.compute_advantages("grpo", r)
    with pytest.raises(ValueError, match="task type and a role"):
        A.compute_advantages("trr++", r)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        A.compute_advantages("adpo", r, group_ids=g, consistency=[2, 0, 0, 0])
