"""The three training jobs end to end on a tiny Qwen3-shaped model (CPU, TP=1, in-process).

* solver-sft lowers held-out NLL;
* solver-dpo raises held-out preference accuracy above 0.8 on pairs that differ
  systematically (chosen boxes the right sum, rejected a negative number);
* SIGTERM mid-run -> exit 75 with a checkpoint -> re-run -> final weights, losses and
  reference log-probs identical to an uninterrupted run;
* WSFT: a weight-0 example contributes exactly nothing, doubling a weight doubles
  its gradient contribution;
* clear errors for an empty pair file, overlong pairs, another architecture.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron_sz.errors import CheckpointError, DataError  # noqa: E402
from megatron_sz.train import testing as T  # noqa: E402
from megatron_sz.train.jobs import run_job  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tokenizer + tiny config, and single-threaded torch (a loaded 2-core box is ~20x
    slower with two intra-op threads fighting other processes)."""
    with T.tiny_job_env(tmp_path_factory.mktemp("train")) as e:
        yield e


def recipe(env, name, **sections):
    return str(T.write_recipe(env["root"] / f"{name}.yaml", config=env["cfg"], tokenizer=env["tok"],
                              sections=sections))


def read_metrics(out: Path, typ="train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == typ]


def load_weights(ckpt_root) -> dict:
    from megatron_sz.megatron import build_model, latest_checkpoint, load_checkpoint

    chunks = build_model(str(latest_checkpoint(ckpt_root)), tp=1, pp=1, init_weights=False)
    load_checkpoint(ckpt_root, chunks)
    return {k: v.detach().clone() for k, v in chunks[0].state_dict().items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def test_solver_sft_lowers_heldout_nll(env, rng_seed):
    data = T.write_records(env["root"] / "sft.jsonl", T.arithmetic_problems(60, seed=rng_seed))
    r = recipe(env, "sft", seed=rng_seed, solver={"sft": {"max_length": 160, "eval_fraction": 0.2, "export_hf": True,
                                                          "optim": {"lr": 3e-3, "warmup_steps": 2, "decay": "cosine"}}})
    out = env["root"] / "sft-out"
    res = run_job("solver-sft", r, data, None, out)
    assert res.exit_code == 0 and res.step == res.total_steps == 12
    s = json.loads((out / "summary.json").read_text())
    start, end = s["eval_start"]["eval_nll"], s["eval_end"]["eval_nll"]
    print(f"held-out NLL {start:.3f} -> {end:.3f}")
    assert end < start - 1.0
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == list(range(1, 13))
    assert all(k in rows[0] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "eta_s", "mfu"))
    assert rows[0]["lr"] < rows[1]["lr"]  # warm-up
    # The HF export is a self-contained folder for the next stage's rollouts.
    hf = Path(res.hf_dir)
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors")) and (hf / "tokenizer.model").exists()


def test_solver_dpo_raises_heldout_preference_accuracy(env, rng_seed):
    pairs = T.arithmetic_pairs(64, seed=rng_seed, wrong="negative")
    data = T.write_records(env["root"] / "pairs.jsonl", pairs)
    r = recipe(env, "dpo", seed=rng_seed, solver={"dpo": {"eval_fraction": 0.25, "beta": 0.1,
                                                          "optim": {"lr": 3e-3, "decay": "constant"}}})
    out = env["root"] / "dpo-out"
    res = run_job("solver-dpo", r, data, None, out)
    s = res.summary
    print("eval", s["eval_start"], "->", s["eval_end"])
    assert s["eval_start"]["eval_accuracy"] == 0.0 and abs(s["eval_start"]["eval_margin"]) < 1e-6  # policy == ref
    assert s["eval_end"]["eval_accuracy"] > 0.8 and s["eval_end"]["eval_margin"] > 0.1
    ref = torch.load(out / "ref_logps.pt", weights_only=False)
    assert ref["logps"].shape == (64, 2) and (ref["logps"] < 0).all()
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at the first step (policy == ref)
    assert all("margin" in x and "accuracy" in x for x in rows)


def test_sigterm_resume_matches_uninterrupted_run(env, rng_seed, monkeypatch):
    data = T.write_records(env["root"] / "pairs-r.jsonl", T.arithmetic_pairs(40, seed=rng_seed))
    r = recipe(env, "resume", seed=rng_seed, solver={"dpo": {"optim": {"lr": 2e-3, "warmup_steps": 3,
                                                                        "decay": "cosine", "weight_decay": 0.01}}})
    full = run_job("solver-dpo", r, data, None, env["root"] / "full")
    assert full.exit_code == 0 and full.total_steps == 10
    out = env["root"] / "killed"
    monkeypatch.setenv("MEGATRON_SZ_SIGNAL_AT_STEP", "4")  # a real SIGTERM to ourselves during step 5
    first = run_job("solver-dpo", r, data, None, out)
    assert first.exit_code == 75 and first.step == 5
    assert json.loads((out / "summary.json").read_text())["exit_code"] == 75
    ref_mtime = (out / "ref_logps.pt").stat().st_mtime_ns
    monkeypatch.delenv("MEGATRON_SZ_SIGNAL_AT_STEP")
    second = run_job("solver-dpo", r, data, None, out)
    assert second.exit_code == 0 and second.step == 10
    assert (out / "ref_logps.pt").stat().st_mtime_ns == ref_mtime  # computed once per round
    a, b = load_weights(env["root"] / "full" / "checkpoint"), load_weights(out / "checkpoint")
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"weights differ after resume: {bad[:5]}"
    la, lb = read_metrics(env["root"] / "full"), read_metrics(out)
    assert [x["step"] for x in lb] == list(range(1, 11))
    assert [(x["loss"], x["lr"]) for x in la] == [(x["loss"], x["lr"]) for x in lb]


def _flat_grads(chunks):
    return torch.cat([p.grad.reshape(-1) for p in chunks[0].parameters() if p.grad is not None])


def test_wsft_zero_weight_changes_nothing_and_double_weight_doubles_gradient(env, rng_seed):
    from megatron_sz import dist
    from megatron_sz import megatron as adapter
    from megatron_sz.megatron.training import parallel_info
    from megatron_sz.train.data import collate, tokenize_examples
    from megatron_sz.train.objectives import WSFTObjective

    dist.init_from_env()
    adapter.initialize_parallel(1, 1, seed=rng_seed)
    chunks = adapter.build_model(env["cfg"], tp=1, pp=1)
    info = parallel_info()
    rng = random.Random(rng_seed)
    recs = T.arithmetic_weighted(4, seed=rng_seed)
    items, _ = tokenize_examples(((r.prompt, r.target, r.weight, i) for i, r in enumerate(recs)), env["tokenizer"],
                                 max_length=64, overlong="truncate")
    garbage, _ = tokenize_examples([("Compute 7 + 7.", "entirely different target text 12345", 1.0, 0)],
                                   env["tokenizer"], max_length=64, overlong="truncate")
    for normalization in ("sum", "sequence", "token"):
        obj = WSFTObjective(normalization=normalization, tp_group=None, vocab_size=env["cfg"]["vocab_size"])
        weights = [rng.uniform(0.2, 1.5) for _ in items]

        def grad(ws, swap_k=None):
            its = list(items)
            if swap_k is not None:
                its[swap_k] = type(items[0])(index=items[swap_k].index, seqs=garbage[0].seqs)
            for it, w in zip(its, ws):
                it.weight = w
            mb = collate(its, pad_id=0, seq_len=64)
            for p in chunks[0].parameters():
                p.grad = None
            hidden = adapter.forward_hidden(chunks[0], mb.input_ids, mb.position_ids).transpose(0, 1)
            loss, _ = obj.train_loss(hidden, adapter.lm_head_weight(chunks[0]), mb)
            loss.backward()
            return _flat_grads(chunks)

        k = rng.randrange(len(items))
        w0 = list(weights)
        w0[k] = 0.0
        g_zero = grad(w0)
        g_zero_swapped = grad(w0, swap_k=k)
        if normalization != "token":  # "token" divides by all target tokens, which the swap changes
            assert torch.allclose(g_zero, g_zero_swapped, rtol=1e-5, atol=1e-7), normalization
        g1 = grad(weights)
        w2 = list(weights)
        w2[k] *= 2
        g2 = grad(w2)
        contrib1, contrib2 = g1 - g_zero, g2 - g_zero
        assert contrib1.abs().max() > 0
        assert torch.allclose(contrib2, 2 * contrib1, rtol=1e-4, atol=1e-6), normalization
    assert info.tp == 1


def test_empty_pair_file_is_a_clear_error(env, tmp_path):
    from megatron_sz.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no pairs"):
        run_job("solver-dpo", recipe(env, "err"), empty, None, tmp_path / "out")
    code = main(["train", "solver-dpo", "--recipe", recipe(env, "err"), "--data", str(empty),
                 "--out", str(tmp_path / "out2")])
    assert code == 2


def test_overlong_pairs_are_counted_or_refused(env, tmp_path, rng_seed, capsys):
    from megatron_sz.train.jobs import load_items
    from megatron_sz.recipe import load_recipe

    pairs = T.arithmetic_pairs(12, seed=rng_seed)
    n_long = 5
    for p in pairs[:n_long]:
        p.chosen = p.chosen + " and so on" * 20
    data = T.write_records(tmp_path / "pairs.jsonl", pairs)
    for policy in ("truncate", "drop"):
        rc = load_recipe(recipe(env, f"ol-{policy}", solver={"dpo": {"max_length": 48, "overlong": policy}}))
        items, stats, _ = load_items("solver-dpo", data, rc, rc.solver.dpo, env["tokenizer"])
        if policy == "truncate":
            assert stats.truncated == n_long and len(items) == 12
            assert all(len(s) <= 48 for it in items for s in it.seqs)
        else:
            assert stats.dropped_overlong == n_long and len(items) == 12 - n_long
        assert f"{n_long} of 12 pairs exceed max_length 48" in capsys.readouterr().err
    with pytest.raises(DataError, match="no pairs left.*max_length"):
        run_job("solver-dpo", recipe(env, "ol-all", solver={"dpo": {"max_length": 10, "overlong": "drop"}}),
                data, None, tmp_path / "out")


def test_checkpoint_of_another_architecture_is_refused(env, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    other = dict(env["cfg"], hidden_size=32, head_dim=8)
    hf = tmp_path / "other-hf"
    Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in other.items() if k != "architectures"})).save_pretrained(hf)
    data = T.write_records(tmp_path / "pairs.jsonl", T.arithmetic_pairs(8, seed=0))
    with pytest.raises(CheckpointError, match="another architecture.*hidden_size 32"):
        run_job("solver-dpo", recipe(env, "arch"), data, str(hf), tmp_path / "out")
    # A Megatron checkpoint written for the recipe's architecture is refused by a recipe for another.
    sft_ckpt = env["root"] / "sft-out" / "checkpoint"
    if sft_ckpt.exists():
        r = str(T.write_recipe(tmp_path / "other.yaml", config=dict(env["cfg"], num_hidden_layers=3),
                               tokenizer=env["tok"]))
        with pytest.raises(CheckpointError, match="num_layers 2 \\(recipe: 3\\)"):
            run_job("solver-dpo", r, data, str(sft_ckpt), tmp_path / "out2")


def test_nonfinite_loss_stops_before_the_optimizer_step(env, tmp_path, monkeypatch):
    from megatron_sz.train import objectives
    from megatron_sz.train.loop import NonFiniteLoss

    data = T.write_records(tmp_path / "sft.jsonl", T.arithmetic_problems(24, seed=1))
    r = recipe(env, "nan", solver={"sft": {"max_length": 160}})
    calls = {"n": 0}
    real = objectives.SFTObjective.train_loss

    def poisoned(self, hidden, weight, mb):
        calls["n"] += 1
        loss, stats = real(self, hidden, weight, mb)
        return (loss * float("nan"), stats) if calls["n"] == 5 else (loss, stats)  # 2 micro-batches per step

    monkeypatch.setattr(objectives.SFTObjective, "train_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="step 3/6: non-finite loss.*NOT applied"):
        run_job("solver-sft", r, data, None, tmp_path / "out")
    assert [x["step"] for x in read_metrics(tmp_path / "out")] == [1, 2]


def test_cli_runs_a_job_and_inits_from_a_megatron_checkpoint(env, tmp_path):
    from megatron_sz.cli import main

    data = T.write_records(tmp_path / "pairs.jsonl", T.arithmetic_pairs(12, seed=2))
    sft_out = env["root"] / "sft-out"
    if not (sft_out / "checkpoint").exists():
        pytest.skip("needs the solver-sft test's checkpoint (run the whole file)")
    code = main(["train", "solver-dpo", "--recipe", recipe(env, "cli"), "--data", str(data), "--init", str(sft_out),
                 "--out", str(tmp_path / "out"), "--max-steps", "2", "--set", "solver.dpo.beta=0.2",
                 "--eval-data", str(T.write_records(tmp_path / "held.jsonl", T.arithmetic_pairs(6, seed=3)))])
    assert code == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["init_kind"] == "mcore" and s["step"] == 2 and s["heldout_items"] == 6
    assert s["eval_start"]["eval_accuracy"] == 0.0 and "eval_accuracy" in s["eval_end"]
    assert torch.load(tmp_path / "out" / "ref_logps.pt", weights_only=False)["logps"].shape == (18, 2)


@pytest.mark.slow
def test_cli_exit_code_75_on_sigterm_then_resume(env, tmp_path):
    """The real command line: SIGTERM during step 3 -> exit 75; the same command again -> 0."""
    import os
    import subprocess
    import sys

    data = T.write_records(tmp_path / "sft.jsonl", T.arithmetic_problems(16, seed=4))
    cmd = [sys.executable, "-m", "megatron_sz", "train", "solver-sft", "--recipe",
           recipe(env, "cli75", solver={"sft": {"max_length": 160}}), "--data", str(data), "--out", str(tmp_path / "o")]
    # A fresh single-process world (in-process jobs above exported MASTER_PORT etc.).
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base_env["OMP_NUM_THREADS"] = "1"
    first = subprocess.run(cmd, env=dict(base_env, MEGATRON_SZ_SIGNAL_AT_STEP="2"), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 75, first.stderr[-2000:]
    assert "received SIGTERM" in first.stderr and "re-run the same command to resume" in first.stderr
    second = subprocess.run(cmd, env=base_env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stderr and "at step 3/4" in second.stderr
    assert [x["step"] for x in read_metrics(tmp_path / "o")] == [1, 2, 3, 4]


def test_activation_recompute_gives_the_same_steps(env, tmp_path):
    data = T.write_records(tmp_path / "sft.jsonl", T.arithmetic_problems(8, seed=5))
    curves = {}
    for mode in ("none", "full"):
        r = recipe(env, f"rc-{mode}", solver={"parallel": {"recompute": mode}, "sft": {"max_length": 160}})
        run_job("solver-sft", r, data, None, tmp_path / mode)
        curves[mode] = [(x["loss"], x["grad_norm"]) for x in read_metrics(tmp_path / mode)]
    assert len(curves["none"]) == 2
    assert curves["full"] == pytest.approx(curves["none"], rel=1e-6)


@pytest.mark.parametrize("loss_type,smoothing", [("ipo", 0.0), ("sigmoid", 0.2), ("simpo", 0.0)])
def test_dpo_loss_options_run(env, tmp_path, loss_type, smoothing):
    data = T.write_records(tmp_path / "pairs.jsonl", T.arithmetic_pairs(8, seed=6))
    r = recipe(env, f"lt-{loss_type}", solver={"dpo": {"loss_type": loss_type, "label_smoothing": smoothing,
                                                        "nll_alpha": 0.5}})
    res = run_job("solver-dpo", r, data, None, tmp_path / "o", max_steps=2)
    rows = read_metrics(tmp_path / "o")
    assert res.exit_code == 0 and len(rows) == 2 and all(math.isfinite(x["loss"]) for x in rows)
    assert (tmp_path / "o" / "ref_logps.pt").exists() == (loss_type != "simpo")  # simpo: no reference model


def test_bench_script_writes_a_csv_row(env, tmp_path, monkeypatch):
    import csv

    from megatron_sz.train import bench

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out_csv = tmp_path / "bench.csv"
    assert bench.main(["--model", "tiny", "--seq", "48", "--steps", "4", "--warmup", "1", "--global-batch", "2",
                       "--micro-batch", "1", "--out", str(tmp_path / "w"), "--csv", str(out_csv)]) == 0
    (row,) = list(csv.DictReader(out_csv.open()))
    assert row["job"] == "solver-dpo" and float(row["tokens_per_s_p50"]) > 0 and row["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 params + fp32 master weights need a CUDA GPU; the CPU tests run the same "
                           "Megatron DDP/DistributedOptimizer path in fp32")
def test_dpo_bf16_megatron_optimizer_on_gpu_resumes(env, tmp_path, monkeypatch):
    data = T.write_records(tmp_path / "pairs.jsonl", T.arithmetic_pairs(32, seed=8, wrong="negative"))
    r = recipe(env, "gpu", device="auto", solver={"model": {"dtype": "bf16"}, "dpo": {"eval_fraction": 0.25}})
    monkeypatch.setenv("MEGATRON_SZ_SIGNAL_AT_STEP", "2")
    first = run_job("solver-dpo", r, data, None, tmp_path / "o")
    assert first.exit_code == 75
    monkeypatch.delenv("MEGATRON_SZ_SIGNAL_AT_STEP")
    second = run_job("solver-dpo", r, data, None, tmp_path / "o")
    assert second.exit_code == 0 and second.step == second.total_steps
    rows = read_metrics(tmp_path / "o")
    assert [x["step"] for x in rows] == list(range(1, second.total_steps + 1))
    assert all(math.isfinite(x["loss"]) and x["grad_norm"] is not None for x in rows)
