"""`megatron-sz ablate`: bootstrap intervals against independent computations, the
equal-compute accounting, the variant recipes, and a 2-variant x 2-seed smoke run on the
micro recipe (tests/test_round.py's). The full 6 x 3 local-tiny ablation is not a test
(docs/NOTEBOOK.md)."""
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_sz import ablation as A
from megatron_sz.pairs import build_wsft_examples, gaussian_weight, linear_weight

from test_round import micro_recipe


# --------------------------------------------------------------------------- bootstrap


def _independent_bootstrap(per_seed, reference=None, n=4000, seed=7):
    """The same two-level percentile bootstrap, written separately with the stdlib."""
    rng = random.Random(seed)
    d = per_seed if reference is None else [[a - b for a, b in zip(x, y)] for x, y in zip(per_seed, reference)]
    stats = []
    for _ in range(n):
        means = []
        for _ in range(len(d)):
            a = d[rng.randrange(len(d))]
            means.append(sum(a[rng.randrange(len(a))] for _ in range(len(a))) / len(a))
        stats.append(sum(means) / len(means))
    stats.sort()
    return stats[int(0.025 * n)], stats[int(0.975 * n) - 1]


def test_bootstrap_by_hand():
    # constant scores: a degenerate interval at the mean
    r = A.bootstrap([[0.5] * 10, [0.5] * 7], n=500)
    assert r == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    # a paired shift of exactly +0.25 on every problem: the difference is exactly 0.25
    ref = [[0.0, 0.25, 0.5, 1.0], [0.75, 0.0, 0.25]]
    var = [[x + 0.25 for x in a] for a in ref]
    d = A.bootstrap(var, reference=ref, n=500)
    assert d["mean"] == pytest.approx(0.25) and d["lo"] == pytest.approx(0.25) and d["hi"] == pytest.approx(0.25)
    # two seeds, problems identical within a seed (0 and 1): only the seed draw varies, the
    # resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4 -> 95% interval [0, 1]
    r = A.bootstrap([[0.0] * 5, [1.0] * 5], n=4000)
    assert r["mean"] == 0.5 and r["lo"] == 0.0 and r["hi"] == 1.0
    with pytest.raises(ValueError):
        A.bootstrap([[1.0, 0.0]], reference=[[1.0]])


def test_bootstrap_one_seed_matches_normal_interval():
    # one seed, 0/1 scores: the problem bootstrap of a proportion ~ p +- 1.96 sqrt(p(1-p)/n)
    n, p = 400, 0.3
    scores = [1.0] * int(n * p) + [0.0] * (n - int(n * p))
    r = A.bootstrap([scores], n=6000)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert r["mean"] == pytest.approx(p)
    assert r["lo"] == pytest.approx(p - half, abs=0.008) and r["hi"] == pytest.approx(p + half, abs=0.008)


def test_bootstrap_matches_independent_implementation():
    rng = random.Random(3)
    ref = [[rng.choice([0, 0.25, 0.5, 0.75, 1.0]) for _ in range(m)] for m in (30, 40, 35)]
    var = [[min(1.0, x + rng.choice([0, 0, 0.25])) for x in a] for a in ref]
    for args in ((var,), (var, ref)):
        mine = A.bootstrap(args[0], reference=args[1] if len(args) > 1 else None, n=6000)
        lo, hi = _independent_bootstrap(*args, n=6000)
        assert mine["lo"] == pytest.approx(lo, abs=0.015) and mine["hi"] == pytest.approx(hi, abs=0.015)


def test_score_table_and_paired_alignment():
    samples = [{"variant": v, "seed": s, "problem_id": p, "sample_index": i, "correct": c}
               for v, s, p, i, c in [("full", 1, "a", 0, True), ("full", 1, "a", 1, False), ("full", 1, "b", 0, False),
                                     ("full", 1, "b", 1, False), ("x", 1, "a", 0, True), ("x", 1, "a", 1, True),
                                     ("x", 1, "b", 0, True), ("x", 1, "b", 1, False), ("x", 2, "a", 0, True)]]
    t = A.score_table(samples)
    assert t["full"][1] == {"a": 0.5, "b": 0.0} and t["x"][1] == {"a": 1.0, "b": 0.5}
    xs, ys, seeds = A._aligned(t, "x")
    assert seeds == [1] and xs == [[1.0, 0.5]] and ys == [[0.5, 0.0]]  # seed 2 has no full run: not paired


# --------------------------------------------------------------------------- accounting


def _metrics(path: Path, lines: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9, "lo')


def test_equal_compute_accounting(tmp_path):
    run = tmp_path / "run"
    r0 = run / "rounds" / "r000"
    _metrics(r0 / "sft", [{"step": 1, "loss": 1.0, "lr": 0.0, "tokens": 100}])  # an lr-0 export: 0 steps
    (r0 / "sft" / "summary.json").write_text(json.dumps({"kind": "solver-sft"}))
    _metrics(r0 / "dpo", [{"step": 1, "loss": 1.0, "lr": 1e-3, "tokens": 300},
                          {"step": 2, "loss": 1.0, "lr": 1e-3, "tokens": 310},
                          {"step": 2, "loss": 1.0, "lr": 1e-3, "tokens": 310},  # logged again after a resume
                          {"step": 2, "eval_nll": 2.0},  # an eval line, not a step
                          {"step": 3, "loss": 1.0, "lr": 0.0, "tokens": 290}])  # cosine's last step at min_lr 0
    (r0 / "dpo" / "summary.json").write_text(json.dumps({"kind": "solver-dpo"}))
    _metrics(r0 / "wsft", [{"step": 1, "loss": 1.0, "lr": 1e-3, "tokens": 50}])
    (r0 / "wsft" / "summary.json").write_text(json.dumps({"kind": "generator-wsft"}))
    rows = A.training_accounting(run)
    by = {r["stage"]: r for r in rows}
    assert (by["sft"]["steps"], by["sft"]["tokens"]) == (0, 0)
    assert (by["dpo"]["steps"], by["dpo"]["tokens"]) == (3, 900)
    assert A.totals(rows, "solver") == {"steps": 3, "tokens": 900}
    assert A.totals(rows, "generator") == {"steps": 1, "tokens": 50}


def test_variant_recipes_fix_the_step_budget(tmp_path):
    from megatron_sz.recipe import load_recipe
    from megatron_sz.round import plan_round

    ab = A.setup(str(micro_recipe(tmp_path)), tmp_path / "ab", variants=None, seeds=[1, 2], k=4, round_steps=5)
    assert ab.variants[0] == "full" and len(ab.runs) == 6 * 2
    for run in ab.runs:
        r = load_recipe(run.recipe)
        assert (r.seed, r.eval.k, r.solver.dpo.max_steps) == (run.seed, 4, 5)
        assert r.eval.sampling.temperature == r.solver.rollout.sampling.temperature
        assert r.solver.dpo.epochs >= 100  # enough passes for max_steps to bind on any round's data
    by = {(x.variant, x.seed): load_recipe(x.recipe) for x in ab.runs}
    assert by["static", 1].curriculum.mode == "static" and plan_round(by["static", 1], 0).names[-4:] == [
        "static", "dpo", "eval", "report"]
    assert by["sft-only-rounds", 2].solver.round_objective == "sft"
    assert by["no-warmup", 1].warmup.enabled is False
    assert by["linear-weights", 1].generator.wsft.weighting == "linear"
    assert by["no-replay", 1].curriculum.replay_ratio == 0.0
    # the round SFT update trains two sequences per step where DPO trains a pair, same steps and optimizer
    from megatron_sz.systems.socratic_zero import round_sft_recipe

    r = round_sft_recipe(by["static", 1])
    assert r.solver.sft.global_batch_size == 2 * r.solver.dpo.global_batch_size
    assert (r.solver.sft.max_steps, r.solver.sft.optim.lr) == (5, r.solver.dpo.optim.lr)
    # a rerun with other settings into the same folder is refused
    from megatron_sz.errors import UserError

    with pytest.raises(UserError):
        A.setup(str(micro_recipe(tmp_path)), tmp_path / "ab", variants=None, seeds=[1], k=8, round_steps=5)


def test_linear_weights():
    assert [linear_weight(k / 4) for k in range(5)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert linear_weight(0.5, mu=0.25) == pytest.approx(2 / 3)
    from megatron_sz.data import Problem, Refinement

    parent = Problem(id="p", problem="1 + 1", answer="2")
    refs = [Refinement(key="p:0", parent_id="p", zone="learning", status="ok",
                       problem=Problem(id="q", problem="2 + 1", answer="3"), attempt="x")]
    for kind, fn in (("gaussian", lambda s: gaussian_weight(s, 0.5, 0.2)), ("linear", linear_weight)):
        ex, _ = build_wsft_examples(refs, {"p": parent}, {"q": (1, 4)}, mu=0.5, sigma=0.2, weighting=kind)
        assert ex[0].weight == pytest.approx(fn(0.25)) and ex[0].weight_source["kind"] == kind


# --------------------------------------------------------------------------- smoke


def _ablate(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_sz", "ablate", str(recipe), "--out", str(out),
                           "--variants", "static", "--seeds", "1,2", "--k", "4", "--round-steps", "2", *extra],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_ablate_smoke_two_variants_two_seeds(tmp_path):
    recipe = micro_recipe(tmp_path, generator={**yaml.safe_load(micro_recipe(tmp_path).read_text())["generator"],
                                               "enabled": False})
    out = tmp_path / "ab"
    t0 = time.time()
    res = _ablate(recipe, out)
    print(f"2 variants x 2 seeds of the micro recipe: {time.time() - t0:.0f} s")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("ablation.md", "ablation.json", "ablation.png", "samples.jsonl", "accounting.jsonl"):
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in rep["rows"]}
    assert set(rows) == {"full", "static"} and rep["missing_runs"] == []
    # the intervals are recomputable from the per-sample records alone
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {(s["variant"], s["seed"]) for s in samples} == {(v, s) for v in ("full", "static") for s in (1, 2)}
    table = A.score_table(samples)
    for v, row in rows.items():
        assert row["k"] == 4 and row["problems_per_seed"] == [6, 6]
        per_seed = [[table[v][s][p] for p in sorted(table[v][s])] for s in (1, 2)]
        assert row["mean_at_k"] == A.bootstrap(per_seed)
        assert row["mean_at_k"]["mean"] == pytest.approx(sum(s["correct"] for s in samples if s["variant"] == v)
                                                         / sum(1 for s in samples if s["variant"] == v))
    xs, ys, _ = A._aligned(table, "static")
    assert rows["static"]["diff_to_full"]["lo"] == A.bootstrap(xs, reference=ys)["lo"]
    # equal compute: the same solver optimizer steps in every variant and seed (warm-up 3 + 1 round x 2)
    acct = [json.loads(x) for x in (out / "accounting.jsonl").read_text().splitlines()]
    for v in ("full", "static"):
        for s in (1, 2):
            assert A.totals([a for a in acct if a["variant"] == v and a["seed"] == s], "solver")["steps"] == 5
    assert rows["static"]["equal_steps"] is True
    assert "static" in (out / "ablation.md").read_text()
    # a rerun skips the finished runs and only reports
    res2 = _ablate(recipe, out)
    assert res2.returncode == 0 and "4 already complete, 0 to run" in res2.stdout
