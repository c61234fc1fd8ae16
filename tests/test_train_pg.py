"""``megatron-sz train policy-gradient`` end to end on a tiny Qwen3-shaped model (CPU, in-process).

* Learning from reward alone: the tiny model samples its own completions (local backend),
  a reward function scores them (1 when the first digit written is even), the job trains
  on the scored rollouts, the new weights sample again. Mean reward rises clearly with
  GRPO and, separately, with TRR++; with the reward's sign flipped it does not rise.
* SIGTERM mid-run -> exit 75 -> re-run: weights, losses and the old log-prob table
  identical to an uninterrupted run.
* The recomputed old log-probs are the starting policy's: the first step's ratio is 1.
* Token-level rollouts (completion ids, loss mask, the sampler's old log-probs); recipe and
  record errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron_sz.data import ScoredRollout, write_jsonl  # noqa: E402
from megatron_sz.errors import DataError, RecipeError  # noqa: E402
from megatron_sz.train import testing as T  # noqa: E402
from megatron_sz.train.jobs import run_job  # noqa: E402

PROMPTS = [f"Compute {a} + {b}.\n" for a, b in [(1, 2), (3, 4), (5, 1), (2, 7), (6, 3), (8, 1), (4, 4), (9, 0)]]
TASKS = ("deduction", "abduction", "induction")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with T.tiny_job_env(tmp_path_factory.mktemp("pg")) as e:
        init = T.save_hf_model(e["root"] / "init", e["cfg"], seed=0, tokenizer=e["tokenizer"])
        yield dict(e, init=str(init))


def recipe(env, name, pg=None, **sections):
    base = {"max_length": 64, "micro_batch_size": 8, "global_batch_size": 16, "epochs": 2, "export_hf": True,
            "optim": {"lr": 3e-3, "warmup_steps": 0, "decay": "constant", "clip_grad": 1.0}}
    base.update(pg or {})
    return str(T.write_recipe(env["root"] / f"{name}.yaml", config=env["cfg"], tokenizer=env["tok"],
                              sections={"solver": {"pg": base}, **sections}))


def even_first_digit(text: str) -> float:
    """1 when the first digit the completion writes is even; 0 when odd or no digit."""
    for ch in text:
        if ch.isdigit():
            return float(int(ch) % 2 == 0)
    return 0.0


def sample(model_dir: str, seed: int, k: int = 8):
    from megatron_sz.inference.base import GenerationRequest
    from megatron_sz.inference.local import LocalBackend
    from megatron_sz.recipe import SamplingSpec

    be = LocalBackend(model_dir, seed=seed)
    reqs = [GenerationRequest(id=f"q{i}", prompt=p, n=k,
                              sampling=SamplingSpec(temperature=1.0, max_tokens=6, seed=seed))
            for i, p in enumerate(PROMPTS)]
    try:
        return be.generate(reqs, progress=False)
    finally:
        be.close()


def scored(results, reward_fn, sign: float) -> tuple[list[ScoredRollout], float]:
    recs, rewards = [], []
    for i, res in enumerate(results):
        for text, finish in zip(res.texts, res.finish_reasons):
            r = reward_fn(text)
            rewards.append(r)
            # six (task type, role) keys, as in Absolute Zero, for TRR++'s baselines
            recs.append(ScoredRollout(prompt=PROMPTS[i], completion=text or " ", reward=sign * r,
                                      group_id=res.id, finished=finish == "stop", task_type=TASKS[i % 3],
                                      role="propose" if i % 2 else "solve"))
    return recs, sum(rewards) / len(rewards)


def reward_curve(env, name, *, estimator: str, sign: float = 1.0, iterations: int = 7) -> list[float]:
    """Sample -> score -> one policy-gradient stage (2 PPO epochs, 8 steps) -> sample again."""
    r = recipe(env, name, {"estimator": estimator})
    current, curve = env["init"], []
    for it in range(iterations):
        recs, mean_r = scored(sample(current, seed=100 + it), even_first_digit, sign)
        curve.append(mean_r)
        data = env["root"] / f"{name}-rollouts-{it}.jsonl"
        write_jsonl(data, recs)
        res = run_job("policy-gradient", r, data, current, env["root"] / f"{name}-{it}")
        assert res.exit_code == 0 and res.step == res.total_steps == 8
        current = res.hf_dir
    curve.append(scored(sample(current, seed=100 + iterations), even_first_digit, sign)[1])
    print(f"{name}: mean reward per stage {[round(c, 3) for c in curve]}")
    return curve


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "trr++"])
def test_policy_gradient_learns_from_reward_alone(env, estimator):
    curve = reward_curve(env, f"learn-{estimator}", estimator=estimator)
    start, end = curve[0], sum(curve[-2:]) / 2
    assert start < 0.35, curve                  # the untrained model rarely starts with an even digit
    assert end > start + 0.3, curve


@pytest.mark.slow
def test_sign_flipped_reward_does_not_rise(env):
    curve = reward_curve(env, "flipped", estimator="grpo", sign=-1.0)
    assert sum(curve[-2:]) / 2 <= curve[0] + 0.02, curve


def _fixed_rollouts(env, n_groups=6, k=4) -> Path:
    import random

    rng = random.Random(0)
    recs = []
    for g in range(n_groups):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        for j in range(k):
            c = rng.randint(0, 18)
            recs.append(ScoredRollout(prompt=f"Compute {a} + {b}.\n", completion=f"The answer is {c}.",
                                      reward=float(c == a + b) + 0.1 * j, group_id=f"g{g}"))
    path = env["root"] / "fixed.jsonl"
    write_jsonl(path, recs)
    return path


def _metrics(out: Path, typ="train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == typ]


def _weights(ckpt_root) -> dict:
    from megatron_sz.megatron import build_model, latest_checkpoint, load_checkpoint

    chunks = build_model(str(latest_checkpoint(ckpt_root)), tp=1, pp=1, init_weights=False)
    load_checkpoint(ckpt_root, chunks)
    return {k: v.detach().clone() for k, v in chunks[0].state_dict().items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def test_sigterm_resume_is_bit_identical(env, monkeypatch):
    data = _fixed_rollouts(env)
    r = recipe(env, "resume", {"global_batch_size": 4, "micro_batch_size": 2, "epochs": 2, "export_hf": False,
                               "entropy_coef": 0.01, "kl_coef": 0.05, "clip_c": 3.0,
                               "optim": {"lr": 2e-3, "warmup_steps": 2, "decay": "cosine", "weight_decay": 0.01}})
    full = run_job("policy-gradient", r, data, env["init"], env["root"] / "pg-full")
    assert full.exit_code == 0 and full.total_steps == 12
    out = env["root"] / "pg-killed"
    monkeypatch.setenv("MEGATRON_SZ_SIGNAL_AT_STEP", "4")
    first = run_job("policy-gradient", r, data, env["init"], out)
    assert first.exit_code == 75 and first.step == 5
    table_mtime = (out / "ref_logps.pt").stat().st_mtime_ns
    monkeypatch.delenv("MEGATRON_SZ_SIGNAL_AT_STEP")
    second = run_job("policy-gradient", r, data, env["init"], out)
    assert second.exit_code == 0 and second.step == 12
    assert (out / "ref_logps.pt").stat().st_mtime_ns == table_mtime   # old log-probs computed once
    a, b = _weights(env["root"] / "pg-full" / "checkpoint"), _weights(out / "checkpoint")
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not bad, f"weights differ after resume: {bad[:5]}"
    la, lb = _metrics(env["root"] / "pg-full"), _metrics(out)
    assert [x["step"] for x in lb] == list(range(1, 13))
    keys = ("loss", "lr", "ratio", "entropy", "approx_kl", "clipfrac_high", "kl_ref")
    assert [[x[k] for k in keys] for x in la] == [[x[k] for k in keys] for x in lb]
    # step 1 trains the very weights the old log-probs came from: ratio 1, no KL, no clipping
    s1 = la[0]
    assert s1["ratio"] == pytest.approx(1.0, abs=1e-5) and abs(s1["approx_kl"]) < 1e-6
    assert s1["clipfrac_low"] == s1["clipfrac_high"] == 0 and abs(s1["kl_ref"]) < 1e-5
    # later steps move away from the behaviour policy
    assert max(x["approx_kl"] for x in la) > 1e-4
    assert all(0 < x["entropy"] for x in la) and {"reward", "advantage", "mfu"} <= set(s1)


def test_token_level_rollouts_with_loss_mask_and_sampler_logps(env):
    tok = env["tokenizer"]
    recs = []
    for g in range(4):
        prompt_ids = tok.encode(f"Compute {g} + 1.\n")
        for j in range(4):
            ids = tok.encode(f"The answer is {g + j}.") + [tok.eos_id]
            mask = [1] * len(ids)
            mask[1:3] = [0, 0]                          # e.g. a tool observation inside the completion
            recs.append(ScoredRollout(prompt="", prompt_ids=prompt_ids, completion_ids=ids, loss_mask=mask,
                                      old_logps=[-3.0] * len(ids), reward=float(j == 1), group_id=f"g{g}"))
    data = env["root"] / "tokens.jsonl"
    write_jsonl(data, recs)
    r = recipe(env, "tokens", {"global_batch_size": 8, "micro_batch_size": 4, "epochs": 1, "export_hf": False,
                               "old_logps": "data", "estimator": "grpo-no-std"})
    out = env["root"] / "tokens-out"
    res = run_job("policy-gradient", r, data, env["init"], out)
    assert res.exit_code == 0 and res.step == 2
    assert not (out / "ref_logps.pt").exists()          # the sampler's log-probs were used
    rows = _metrics(out)
    n_masked = 2 / len(recs[0].completion_ids)
    assert rows[0]["masked_share"] == pytest.approx(n_masked, rel=1e-5)
    assert rows[0]["ratio"] != pytest.approx(1.0, abs=1e-3)   # -3.0 is not this policy's log-prob


def test_recipe_and_record_errors_are_clear(env, tmp_path):
    from megatron_sz.recipe import load_recipe

    with pytest.raises(RecipeError, match="clip_hi.*clip_high"):
        load_recipe(recipe(env, "bad-key", {"clip_hi": 0.3}))
    with pytest.raises(RecipeError, match="estimator"):
        load_recipe(recipe(env, "bad-est", {"estimator": "ppo"}))
    with pytest.raises(RecipeError, match="clip_c"):
        load_recipe(recipe(env, "bad-c", {"clip_c": 0.5}))
    bad = tmp_path / "both.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "completion_ids": [1, 2], "reward": 1}) + "\n")
    with pytest.raises(DataError, match=r"both.jsonl:1.*exactly one of"):
        run_job("policy-gradient", recipe(env, "ok"), bad, env["init"], tmp_path / "o1")
    adpo = tmp_path / "adpo.jsonl"
    write_jsonl(adpo, [ScoredRollout(prompt="p", completion="c d", reward=1.0, group_id="g")] * 4)
    with pytest.raises(DataError, match="consistency"):
        run_job("policy-gradient", recipe(env, "adpo", {"estimator": "adpo"}), adpo, env["init"], tmp_path / "o2")
