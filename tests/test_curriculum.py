"""Curriculum: zones, replay, exact/near de-duplication, provenance, contamination; pairs; WSFT weights.

Pure Python, fresh random inputs per test (rng_seed), checked against brute-force references.
"""
import math
import random


from megatron_sz import curriculum as C
from megatron_sz.data import Problem, Refinement, Trajectory
from megatron_sz.pairs import build_pairs, build_wsft_examples, gaussian_weight, reference_text
from megatron_sz.recipe import CurriculumSpec

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _text(rng, n=12):
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" {rng.randint(0, 10**6)}"


def _problem(rng, i, **kw):
    return Problem(id=f"p{i}", problem=_text(rng), answer=str(rng.randint(0, 99)), **kw)


def test_zone_thresholds():
    assert C.zone_of(1.0) == "mastered"
    assert C.zone_of(0.0) == "too_hard"
    assert C.zone_of(0.5) == "learning"
    assert C.zone_of(0.75, mastered_threshold=0.75, too_hard_threshold=0.25) == "mastered"
    assert C.zone_of(0.25, mastered_threshold=0.75, too_hard_threshold=0.25) == "too_hard"


def test_near_duplicate_index_matches_bruteforce(rng_seed):
    rng = random.Random(rng_seed)
    texts = [_text(rng, rng.randint(3, 20)) for _ in range(60)]
    # near copies: drop or swap one word
    for _ in range(20):
        w = rng.choice(texts).split()
        if len(w) > 3:
            w[rng.randrange(len(w))] = rng.choice(WORDS)
        texts.append(" ".join(w))
    thr = 0.6
    idx = C.DedupIndex(thr)
    for i, t in enumerate(texts):
        got = idx.find(t)
        sims = [(C.jaccard(C.shingles(t), C.shingles(texts[j])), j) for j in range(i)]
        exact = [j for j in range(i) if C.normalize_text(texts[j]) == C.normalize_text(t)]
        if exact:
            assert got is not None and got[0] == "exact"
        elif any(s >= thr for s, _ in sims):
            best = max(s for s, _ in sims)
            assert got is not None and got[0] == "near" and math.isclose(got[2], best)
        else:
            assert got is None
        idx.add(f"t{i}", t)


def test_exact_duplicate_ignores_case_and_spacing():
    idx = C.DedupIndex(0.99)
    idx.add("a", "Compute 3 + 4.")
    assert idx.find("  compute   3 +  4. ")[0] == "exact"


def test_contamination_filter_ngram_and_short(rng_seed):
    rng = random.Random(rng_seed)
    bench = [_text(rng, 30) for _ in range(5)] + ["What is 2+2?"]
    cf = C.ContaminationFilter.from_texts(bench, n=13)
    w = bench[0].split()
    leaked = "Prefix words here " + " ".join(w[5:18]) + " suffix"
    assert cf.hit(leaked) is not None
    assert cf.hit("what is 2+2?") is not None  # short: whole normalised text
    assert cf.hit(_text(rng, 30)) is None


def _pool(rng, n):
    return C.initial_pool([_problem(rng, i) for i in range(n)])


def test_select_active_replay_ratio_and_rechecks(rng_seed):
    rng = random.Random(rng_seed)
    pool = _pool(rng, 40)
    spec = CurriculumSpec(replay_ratio=0.25, recheck_every=2)
    # round 0: all new
    assert [p.id for p in C.select_active(pool, 0, spec, seed=1)] == [p.id for p in pool]
    outcomes = {p.id: (rng.randint(0, 4), 4) for p in pool}
    new = [Problem(id=f"n{i}", problem=_text(rng), answer="1", provenance="teacher", parent_id="p0", round=0)
           for i in range(9)]
    recs = [Refinement(key=f"p0:{i}", parent_id="p0", zone="learning", status="ok", problem=q)
            for i, q in enumerate(new)]
    pool2, rep = C.update_curriculum(pool, 0, spec, outcomes=outcomes, refinements=recs, retire={})
    assert rep.added == 9 and rep.pool_size == 49
    active = C.select_active(pool2, 1, spec, seed=1)
    ids = {p.id for p in active}
    assert {q.id for q in new} <= ids
    hist = [p for p in active if p.id.startswith("p")]
    # too-hard problems are deferred, not replayed in round 1
    deferred = {pid for pid, (c, k) in outcomes.items() if c == 0}
    assert not (deferred & ids)
    assert len(hist) == min(round(9 * 0.25 / 0.75), 40 - len(deferred))
    # they come back at round 0 + recheck_every
    active2 = C.select_active(pool2, 2, spec, seed=1)
    assert deferred <= {p.id for p in active2}
    # deterministic
    assert [p.id for p in C.select_active(pool2, 1, spec, seed=1)] == [p.id for p in active]


def test_update_dedup_contamination_retire_provenance(rng_seed):
    rng = random.Random(rng_seed)
    pool = _pool(rng, 10)
    spec = CurriculumSpec(near_dup_threshold=0.8, max_refinements_per_round=100)
    dup_exact = Problem(id="x1", problem=pool[3].problem.upper(), answer="1", provenance="teacher", parent_id="p3")
    w = pool[4].problem.split()
    near = Problem(id="x2", problem=" ".join(w + ["extra"]), answer="1", provenance="teacher", parent_id="p4")
    bench_text = _text(rng, 20)
    contaminated = Problem(id="x3", problem="Solve: " + bench_text, answer="1", provenance="teacher", parent_id="p5")
    good = Problem(id="x4", problem=_text(rng, 15), answer="2", provenance="teacher", parent_id="p6", round=0)
    failed = Refinement(key="p7:0", parent_id="p7", zone="learning", status="parse_failed")
    recs = [Refinement(key=f"{q.parent_id}:0", parent_id=q.parent_id, zone="learning", status="ok", problem=q)
            for q in (dup_exact, near, contaminated, good)] + [failed]
    cf = C.ContaminationFilter.from_texts([bench_text], n=13)
    new_pool, rep = C.update_curriculum(pool, 0, spec, outcomes={"p1": (0, 4), "p2": (4, 4)}, refinements=recs,
                                        retire={"p1": "not reproduced"}, contamination=cf)
    assert rep.added == 1 and rep.duplicate_exact == 1 and rep.duplicate_near == 1 and rep.contaminated == 1
    assert rep.retired == 1
    by_id = {p.id: p for p in new_pool}
    assert by_id["x4"].parent_id == "p6" and by_id["x4"].provenance == "teacher"
    assert C.state(by_id["p1"])["status"] == "retired"  # kept for provenance, never rolled out again
    assert C.state(by_id["p2"])["zone"] == "mastered"
    assert "p1" not in {p.id for p in C.select_active(new_pool, 5, spec, seed=0)}
    # pool never loses problems
    assert {p.id for p in pool} <= set(by_id)


def test_pairs_every_winner_times_loser_and_reference(rng_seed):
    rng = random.Random(rng_seed)
    problems = {f"p{i}": Problem(id=f"p{i}", problem=f"q{i}", answer=str(i), solution=f"sol {i}") for i in range(6)}
    trajs, expect = [], 0
    for pid in problems:
        verdicts = [rng.choice([True, False, None]) for _ in range(rng.randint(1, 8))]
        for j, v in enumerate(verdicts):
            trajs.append(Trajectory(problem_id=pid, sample_index=j, text=f"{pid}-{j}", correct=v))
        w, l = verdicts.count(True), verdicts.count(False)
        expect += w * l if w else l
    rng.shuffle(trajs)
    pairs, stats = build_pairs(problems, trajs, prompt_fn=lambda p: "P:" + p.problem)
    assert len(pairs) == expect
    for pr in pairs:
        tr = {(t.problem_id, t.text): t for t in trajs}
        assert tr[(pr.problem_id, pr.rejected)].correct is False
        if pr.origin == "reference_winner":
            assert pr.chosen == reference_text(problems[pr.problem_id])
            assert not any(t.correct for t in trajs if t.problem_id == pr.problem_id)
        else:
            assert tr[(pr.problem_id, pr.chosen)].correct is True
    assert stats["solver_pairs"] + stats["reference_pairs"] == expect


def test_gaussian_weights_match_paper():
    got = [round(gaussian_weight(s / 8), 3) for s in range(9)]
    assert got == [0.044, 0.172, 0.458, 0.823, 1.0, 0.823, 0.458, 0.172, 0.044]


def test_wsft_examples(rng_seed):
    rng = random.Random(rng_seed)
    parents = {"p0": Problem(id="p0", problem="old problem", answer="1")}
    refs, rates = [], {}
    for i in range(5):
        qid = f"n{i}"
        refs.append(Refinement(key=f"p0:{i}", parent_id="p0", zone="learning", status="ok", attempt="wrong attempt",
                               problem=Problem(id=qid, problem=f"new {i}", answer="2")))
        if i:
            rates[qid] = (rng.randint(0, 4), 4)
    ex, stats = build_wsft_examples(refs, parents, rates, mu=0.5, sigma=0.2)
    assert stats["no_rate"] == 1 and len(ex) == 4
    for e in ex:
        c, k = rates[e.problem_id]
        assert math.isclose(e.weight, gaussian_weight(c / k))
        assert "old problem" in e.prompt and "wrong attempt" in e.prompt and e.target.startswith("new")


def test_seed_select_band_quotas_diversity(rng_seed):
    from megatron_sz.seed_select import select_seeds, subject_quotas

    rng = random.Random(rng_seed)
    subjects = ["Algebra", "Geometry", "Prealgebra"]
    pool, rates = [], {}
    for i in range(90):
        base = _text(rng, 14)
        p = Problem(id=f"c{i}", problem=base, answer="1", subject=subjects[i % 3])
        pool.append(p)
        rates[p.id] = rng.choice([0.0, 0.125, 0.25, 0.5, 0.625, 0.75, 1.0])
        dup = Problem(id=f"d{i}", problem=base + " again", answer="1", subject=p.subject)  # near-duplicate
        pool.append(dup)
        rates[dup.id] = rates[p.id]
    n = 12
    seeds, rep = select_seeds(pool, rates, n=n, low=0.1, high=0.7)
    in_band = [p for p in pool if 0.1 <= rates[p.id] <= 0.7]
    assert rep.in_band == len(in_band)
    assert all(0.1 <= rates[p.id] <= 0.7 for p in seeds)
    assert len(seeds) == min(n, len(in_band)) and len({p.id for p in seeds}) == len(seeds)
    counts = {s: sum(p.subject == s for p in seeds) for s in subjects}
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced
    # diversity: never a problem together with its near-duplicate
    ids = {p.id for p in seeds}
    assert not any(f"c{i}" in ids and f"d{i}" in ids for i in range(90))
    assert subject_quotas(100, ["A", "B"], {"A": 15, "B": 10}) == {"A": 60, "B": 40}
    # deterministic
    assert [p.id for p in select_seeds(pool, rates, n=n)[0]] == [p.id for p in seeds]


def test_pairs_skip_empty_completions():
    problems = {"p": Problem(id="p", problem="q", answer="1", solution="s")}
    trajs = [Trajectory(problem_id="p", sample_index=0, text="", correct=False),
             Trajectory(problem_id="p", sample_index=1, text="  ", correct=True),
             Trajectory(problem_id="p", sample_index=2, text="wrong", correct=False)]
    pairs, stats = build_pairs(problems, trajs, prompt_fn=lambda p: p.problem)
    assert [(x.chosen, x.rejected, x.origin) for x in pairs] == [(reference_text(problems["p"]), "wrong", "reference_winner")]
    assert stats["empty_samples"] == 2
    for x in pairs:
        x.validate()
