"""PromptCoT end to end on CPU: the cluster recipe plans, a weight-0 problem gives exactly
zero gradient through the WSFT kernel, the synthesized set drops planted benchmark
problems, and a micro `megatron-sz evolve` survives a kill with nothing lost or duplicated.

The micro recipe is promptcot-tiny shrunk (a 2-layer, 32-wide model, 16 problems, a few
optimizer steps, two rounds, downstream on) so the whole pipeline runs in CI time.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO_MODEL = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 256, "vocab_size": 384, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
    "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
}
PLANTED = ["Compute 3 + 4.", "Compute 2 * 5.", "Compute 8 + 1.", "Compute 7 * 7."]


def micro_recipe(tmp_path: Path, **top) -> Path:
    r = yaml.safe_load((ROOT / "recipes" / "promptcot-tiny.yaml").read_text())
    r.update(name="pc-micro", rounds=2, seeds_from_teacher=16)
    r["warmup"] = {"difficulty": [1, 1], "families": ["add", "mul"]}
    r["tokenizer"]["vocab_size"] = 384
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": p, "answer": "0"}) + "\n" for p in PLANTED))
    r["curriculum"] = {"contamination_files": [str(bench)]}
    short = {"max_length": 48, "micro_batch_size": 8, "global_batch_size": 8, "normalization": "sum"}
    r["promptcot"].update(requests_per_round=4, reference_k=1,
                          sft={**short, "max_steps": 8, "optim": {"lr": 3e-3}})
    for role in ("solver", "generator"):
        r[role]["model"] = {"config": dict(MICRO_MODEL), "dtype": "fp32"}
    r["generator"]["wsft"] = {**short, "max_steps": 2, "optim": {"lr": 1e-3}}
    r["generator"]["rollout"].update(k=2, sampling={"temperature": 1.0, "max_tokens": 20, "seed": 0})
    r["solver"]["sft"] = {"max_length": 64, "micro_batch_size": 8, "global_batch_size": 8, "max_steps": 2,
                          "optim": {"lr": 1e-3}}
    r["solver"]["rollout"]["sampling"] = {"temperature": 1.0, "max_tokens": 12, "seed": 0}
    r["eval"] = {"heldout_size": 8, "sampling": {"temperature": 0.0, "max_tokens": 12}}
    r["wandb"] = {"mode": "disabled"}
    r.update(top)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _shards(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("shard-*.jsonl")) for r in _rows(f)]


# --------------------------------------------------------------------------- plans


def test_plan_accepts_the_cluster_recipe():
    from megatron_sz.recipe import load_recipe
    from megatron_sz.round import plan_round

    recipe = ROOT / "recipes" / "promptcot-llama3.1-8b.yaml"
    res = subprocess.run([sys.executable, "-m", "megatron_sz", "plan", str(recipe)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    r = load_recipe(recipe)
    assert r.system == "promptcot" and len(r.promptcot.judges) == 2
    for t in range(r.rounds):
        names = plan_round(r, t).names
        assert {"sample", "judge", "select", "rs", "synthesize", "report"} <= set(names)
    assert {"solutions", "solver_sft", "quality"} <= set(plan_round(r, r.rounds - 1).names)


def test_token_normalization_is_refused(tmp_path):
    from megatron_sz.errors import UserError
    from megatron_sz.recipe import load_recipe
    from megatron_sz.round import plan_round

    r = load_recipe(ROOT / "recipes" / "promptcot-tiny.yaml", {"generator.wsft.normalization": "token"})
    with pytest.raises(UserError, match="weight-0"):
        plan_round(r, 0)


# --------------------------------------------------------------------------- weight 0


def test_weight_zero_problem_gives_zero_gradient(tmp_path, rng_seed):
    """Rejection sampling's {0,1} weights through the WSFT kernel: replacing a weight-0
    (rejected) candidate by entirely different text leaves the gradient unchanged, and a
    weight-1 candidate's contribution is non-zero."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from megatron_sz import dist
    from megatron_sz import megatron as adapter
    from megatron_sz.data import CandidateProblem
    from megatron_sz.systems.promptcot import weigh_candidates
    from megatron_sz.systems.promptcot_rubric import judge_score, parse_rubric, symbolic_judgement
    from megatron_sz.train import testing as T
    from megatron_sz.train.data import collate, tokenize_examples
    from megatron_sz.train.objectives import WSFTObjective

    rng = random.Random(rng_seed)
    cands, scores = [], []
    for i in range(6):
        fam = rng.choice(["add", "mul"])
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        problem = f"Compute {a} {'+' if rng.random() < 0.5 else '*'} {b}."
        c = CandidateProblem(id=f"r000-q{i:05d}-s0", round=0, request_id=f"r000-q{i:05d}",
                             prompt=f"Concepts: {fam}\nDifficulty: 1\nRationale:",
                             text=f" {fam} two one-digit numbers.\nProblem: {problem}", concepts=[fam], difficulty=1,
                             problem=problem)
        cands.append(c)
        for judge in ("judge_a", "judge_b"):
            reply, det = symbolic_judgement(problem, [fam], 1)
            scores.append(judge_score(c.id, judge, parse_rubric(reply), 5, raw=reply, detected=det))
    examples, kept, _ = weigh_candidates(cands, scores, ["judge_a", "judge_b"], round=0)
    weights = [e.weight for e in examples]
    if 0.0 not in weights or 1.0 not in weights:  # the draw made every candidate agree: force one of each
        examples[0].weight, examples[1].weight = 1.0, 0.0
        weights = [e.weight for e in examples]
    assert set(weights) == {0.0, 1.0}
    zero = weights.index(0.0)
    one = weights.index(1.0)

    tok = T.make_tokenizer(tmp_path / "tok")
    cfg = T.tiny_config(tok.vocab_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with T.isolated_world():
            dist.init_from_env()
            adapter.initialize_parallel(1, 1, seed=rng_seed)
            chunks = adapter.build_model(cfg, tp=1, pp=1)

            def items_of(exs):
                its, _ = tokenize_examples(((e.prompt, e.target, e.weight, i) for i, e in enumerate(exs)), tok,
                                           max_length=64, overlong="truncate")
                return its

            def grad(exs, normalization):
                obj = WSFTObjective(normalization=normalization, tp_group=None, vocab_size=cfg["vocab_size"])
                mb = collate(items_of(exs), pad_id=0, seq_len=64)
                for p in chunks[0].parameters():
                    p.grad = None
                hidden = adapter.forward_hidden(chunks[0], mb.input_ids, mb.position_ids).transpose(0, 1)
                loss, _ = obj.train_loss(hidden, adapter.lm_head_weight(chunks[0]), mb)
                loss.backward()
                return torch.cat([p.grad.reshape(-1) for p in chunks[0].parameters() if p.grad is not None])

            import copy

            swapped = copy.deepcopy(examples)
            swapped[zero].target = " completely different text 98765 that no judge kept"
            without_one = copy.deepcopy(examples)
            without_one[one].weight = 0.0
            for norm in ("sum", "sequence"):
                g, g_swapped = grad(examples, norm), grad(swapped, norm)
                assert torch.allclose(g, g_swapped, rtol=1e-5, atol=1e-7), norm
                assert (g - grad(without_one, norm)).abs().max() > 0, norm
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- contamination


def test_synthesize_drops_planted_and_near_identical_problems(tmp_path):
    from megatron_sz.data import SynthesizedProblem, read_jsonl, write_jsonl
    from megatron_sz.recipe import load_recipe
    from megatron_sz.round import RoundContext, plan_round
    from megatron_sz.rundir import RunDir
    from megatron_sz.systems.promptcot import synthesize
    from megatron_sz.textsim import ShingleIndex, normalize_text

    path = micro_recipe(tmp_path)
    recipe = load_recipe(path)
    rd = RunDir.create_or_open(tmp_path / "run", recipe_text=path.read_text(), recipe_source=str(path),
                              name="pc-micro", seed=1)
    write_jsonl(rd.prepare_dir / "heldout.jsonl", [])
    long = ("Let n be the number of ordered pairs of positive integers (a, b) with a + b = 100 and gcd(a, b) = 1. "
            "Find the remainder when n is divided by 7.")
    bench = tmp_path / "bench2.jsonl"
    bench.write_text(json.dumps({"question": long}) + "\n")
    recipe.eval.benchmarks = [str(bench)]
    texts = ["Compute 3 + 4.", "compute  3 + 4 .", "COMPUTE 2 * 5.", "Compute 3 + 5.", "Compute 3 + 5.",
             long.replace("Find", "Determine"), long + " Give the answer as an integer.", "Compute 6 * 9."]
    kept = [SynthesizedProblem(id=f"pc-{i}", problem=t, round=0, candidate_id=f"r000-q{i:05d}-s0", concepts=["add"],
                               difficulty=1) for i, t in enumerate(texts)]
    write_jsonl(rd.round_dir(0) / "kept.jsonl", kept)
    plan = plan_round(recipe, 0)
    ctx = RoundContext(rd=rd, recipe=recipe, t=0, plan=plan, stage=plan.stage("synthesize"))
    info = synthesize(ctx, None)
    out = [p.problem for p in read_jsonl(rd.round_dir(0) / "synthesized.jsonl", SynthesizedProblem)]
    assert out == ["Compute 3 + 5.", "Compute 6 * 9."]
    assert info["contaminated"] == 5 and info["exact_duplicates"] == 1
    index = ShingleIndex().add_all(enumerate(PLANTED + [long]))
    for t in out:
        assert index.exact(t) is None and index.similar(t, 0.5) is None, t
        assert normalize_text(t) not in {normalize_text(p) for p in PLANTED}


# --------------------------------------------------------------------------- micro run


def _evolve(recipe: Path, run: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_sz", "evolve", str(recipe), "--run-dir", str(run),
                           "--no-progress"], capture_output=True, text=True, timeout=timeout, env=env)


def check_run(run: Path, rounds: int, k: int = 2, requests: int = 4) -> None:
    from megatron_sz.textsim import ShingleIndex

    for t in range(rounds):
        rdir = run / "rounds" / f"r{t:03d}"
        cands = _shards(rdir / "sample")
        ids = [c["id"] for c in cands]
        assert len(ids) == len(set(ids)) == k * requests, f"round {t}: candidates lost or duplicated"
        scores = _shards(rdir / "judge")
        keys = [(s["candidate_id"], s["judge"]) for s in scores]
        ok = {c["id"] for c in cands if c["status"] == "ok"}
        assert len(keys) == len(set(keys)) and set(keys) == {(c, j) for c in ok for j in ("judge_a", "judge_b")}
        rs = _rows(rdir / "rs.jsonl")
        assert sorted(e["problem_id"] for e in rs) == sorted(e["problem_id"] for e in rs if e["weight"] in (0.0, 1.0))
        sel = json.loads((rdir / "_done" / "select.json").read_text())
        assert sel["candidates"] == k * requests and "heldout_filtered" in sel
        assert sel["weight1"] + sel["weight0"] == len(rs)
        kept_ids = {p["candidate_id"] for p in _rows(rdir / "kept.jsonl")}
        assert all(e["weight"] == (1.0 if e["problem_id"] in kept_ids else 0.0) for e in rs)
    synth = _rows(run / "rounds" / f"r{rounds - 1:03d}" / "synthesized.jsonl")
    assert len({p["id"] for p in synth}) == len(synth)
    assert all(p["judge_scores"] and p["concepts"] and p["rationale"] is not None for p in synth)
    assert _rows(run / "synthesized.jsonl") == synth
    index = ShingleIndex().add_all(enumerate(PLANTED))
    held = [json.loads(x)["problem"] for x in (run / "prepare" / "heldout.jsonl").read_text().splitlines()]
    index.add_all((f"h{i}", h) for i, h in enumerate(held))
    for p in synth:
        assert index.exact(p["problem"]) is None and index.similar(p["problem"], 0.8) is None, p["problem"]
    metrics = _rows(run / "metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(rounds))
    assert all(set(m["pass_rate"]) == {"judge_a", "judge_b"} and "difficulty_hist" in m for m in metrics)
    assert "quality" in metrics[-1] and "diversity" in metrics[-1]["quality"]
    assert (run / "plot.png").stat().st_size > 1000


@pytest.mark.slow
def test_micro_evolve_kill_and_resume(tmp_path, rng_seed):
    """Kill the executor (and its children) once a random stage has started; the resumed
    run completes with every candidate and score present exactly once."""
    recipe = micro_recipe(tmp_path)
    run = tmp_path / "run"
    rng = random.Random(rng_seed)
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sz", "evolve", str(recipe), "--run-dir", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    target = rng.choice(["sft", "sample", "rs", "judge", "solver_sft"])
    deadline = time.time() + 600
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"] {target:<10}" in line and line.rstrip().endswith("..."):
            time.sleep(rng.uniform(0.2, 3.0))
            break
        assert time.time() < deadline
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"killed during {target}")
    t0 = time.time()
    res = _evolve(recipe, run)
    assert res.returncode == 0, "".join(seen)[-2000:] + res.stdout[-3000:] + res.stderr[-3000:]
    print(f"resumed run: {time.time() - t0:.1f} s")
    check_run(run, rounds=2)
    again = _evolve(recipe, run)
    assert again.returncode == 0 and "already complete" in again.stdout
