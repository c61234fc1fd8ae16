"""No role trains on held-out problems: plant one in each role's training path, expect it
filtered and counted (warm-up SFT data and D_0, the solver's DPO pairs, the generator's
WSFT examples, the next curriculum)."""
import json
from pathlib import Path

from test_round import micro_recipe

from megatron_sz.data import Problem, Refinement, Verdict, read_jsonl, write_jsonl
from megatron_sz.executor import execute_stage
from megatron_sz.round import RoundContext, plan_round
from megatron_sz.rundir import RunDir
from megatron_sz.textsim import normalize_text

PLANTED = "A train leaves at 7 and travels 3 hours; what time does it arrive, counting on a 12-hour clock?"


def _run(tmp_path: Path, **top):
    path = micro_recipe(tmp_path, **top)
    text = path.read_text()
    rd = RunDir.create_or_open(tmp_path / "run", recipe_text=text, recipe_source=str(path), name="micro", seed=1)
    return rd, rd.load_recipe()


def _ctx(rd, recipe, t, stage):
    plan = plan_round(recipe, t)
    return RoundContext(rd=rd, recipe=recipe, t=t, progress=False, plan=plan, stage=plan.stage(stage))


def _texts(path: Path) -> list[str]:
    return [json.dumps(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def test_prepare_drops_heldout_seeds_and_warmup(tmp_path):
    seeds = [Problem(id=f"s{i}", problem=f"What is {i} + {i + 10}?", answer=str(2 * i + 10)) for i in range(6)]
    seeds.append(Problem(id="leak", problem=PLANTED.upper(), answer="10"))  # same problem, other case
    write_jsonl(tmp_path / "seeds.jsonl", seeds)
    write_jsonl(tmp_path / "held.jsonl", [Problem(id="h0", problem=PLANTED, answer="10")])
    write_jsonl(tmp_path / "warm.jsonl", seeds[:3] + [Problem(id="w-leak", problem=PLANTED + " ", answer="10",
                                                                 solution="7 + 3 = 10")])
    rd, recipe = _run(tmp_path, seeds_from_teacher=0, seeds_file=str(tmp_path / "seeds.jsonl"),
                      warmup={"data_file": str(tmp_path / "warm.jsonl"), "difficulty": [1, 1]},
                      eval={"enabled": True, "heldout_file": str(tmp_path / "held.jsonl"), "k": 1,
                            "sampling": {"temperature": 0.0, "max_tokens": 8}})
    execute_stage(rd, recipe, 0, "prepare", progress=False)
    marker = rd.read_marker(0, "prepare")
    assert marker["heldout_filtered_seeds"] == 1 and marker["heldout_filtered_warmup"] == 1
    pool = read_jsonl(rd.round_dir(0) / "pool.jsonl", Problem)
    assert "leak" not in {p.id for p in pool} and len(pool) == 6
    sft = (rd.prepare_dir / "sft.jsonl").read_text()
    assert normalize_text(PLANTED) not in normalize_text(sft) and "w-leak" not in sft


def test_pairs_wsft_and_curriculum_drop_heldout(tmp_path):
    rd, recipe = _run(tmp_path)
    write_jsonl(rd.prepare_dir / "heldout.jsonl", [Problem(id="h0", problem=PLANTED, answer="10")])
    clean = Problem(id="c0", problem="What is 2 + 2?", answer="4")
    leak = Problem(id="p-leak", problem=PLANTED, answer="10")
    r0 = rd.round_dir(0)
    write_jsonl(r0 / "active.jsonl", [clean, leak])
    write_jsonl(r0 / "pool.jsonl", [clean, leak])
    verdicts = [Verdict(problem_id=p.id, sample_index=i, text=f"The answer is \\boxed{{{i}}}.", correct=i == 0,
                        verifier="rule") for p in (clean, leak) for i in range(2)]
    n = recipe.teacher.shards
    for i in range(n):
        write_jsonl(rd.shard_path(0, "verify", i, n), verdicts if i == 0 else [])

    # solver DPO pairs
    ctx = _ctx(rd, recipe, 0, "pairs")
    from megatron_sz.systems import socratic_zero as sz

    stats = sz.build_preference_pairs(ctx, None)
    pairs = read_jsonl(r0 / "pairs.jsonl")
    assert stats["heldout_filtered"] == 1 and pairs and {p["problem_id"] for p in pairs} == {"c0"}

    # generator WSFT: a refinement that IS the held-out problem, one whose parent is, one clean
    refs = [Refinement(key="c0:0", parent_id="c0", zone="learning", status="ok", attempt="x",
                       problem=Problem(id="n-leak", problem=PLANTED, answer="10", provenance="teacher")),
            Refinement(key="p-leak:0", parent_id="p-leak", zone="learning", status="ok", attempt="x",
                       problem=Problem(id="n-parent", problem="What is 9 - 4?", answer="5", provenance="teacher")),
            Refinement(key="c0:1", parent_id="c0", zone="learning", status="ok", attempt="x",
                       problem=Problem(id="n-ok", problem="What is 3 * 3?", answer="9", provenance="teacher"))]
    for i in range(n):
        write_jsonl(rd.shard_path(0, "refine", i, n), refs if i == 0 else [])
    probes = [Verdict(problem_id=q, sample_index=0, text="t", correct=True, verifier="rule")
              for q in ("n-leak", "n-parent", "n-ok")]
    m = recipe.solver.rollout.shards
    for i in range(m):
        write_jsonl(rd.shard_path(0, "probe", i, m), probes if i == 0 else [])
    examples, stats = sz.wsft_examples(_ctx(rd, recipe, 0, "wsft"))
    assert stats["heldout_filtered"] == 2 and [e.problem_id for e in examples] == ["n-ok"]

    # the next curriculum (the solver's pool) keeps the held-out refinement out too
    rep = sz.update_curriculum(_ctx(rd, recipe, 0, "curriculum"), None)
    nxt = {p.id for p in read_jsonl(rd.round_dir(1) / "pool.jsonl", Problem)}
    assert "n-leak" not in nxt and "n-ok" in nxt and rep["contaminated"] == 1


def test_benchmark_files_count_as_heldout(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": PLANTED, "answer": "10"}) + "\n")
    rd, recipe = _run(tmp_path, curriculum={"contamination_files": [str(bench)]})
    from megatron_sz import heldout

    guard = heldout.for_run(rd, recipe)
    kept, dropped = guard.filter([PLANTED, "What is 1 + 1?"], lambda s: (s,))
    assert kept == ["What is 1 + 1?"] and dropped == 1
