"""Layout planner: parameter counts against HF models (meta device), per-rank sharding
against an independent per-tensor count, memory arithmetic, refusals, and the CLI."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from megatron_sz.cli import main
from megatron_sz.errors import LayoutError
from megatron_sz.model_shape import check_model_layout, model_shape, padded_vocab
from megatron_sz.planner import GiB, plan_layout


def _random_config(rng: random.Random, model_type: str) -> dict:
    kv = rng.choice([1, 2, 4])
    heads = kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16, 24])
    hidden = rng.choice([32, 48, 64, 96])
    cfg = {"model_type": model_type, "architectures": [f"{model_type.capitalize()}ForCausalLM"],
           "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
           "intermediate_size": rng.choice([40, 64, 88, 120]), "num_hidden_layers": rng.choice([2, 4, 6]),
           "vocab_size": rng.randint(300, 1000), "tie_word_embeddings": rng.random() < 0.5}
    if model_type in ("llama", "mistral"):  # LlamaConfig insists on hidden % heads == 0 (head_dim may differ)
        cfg["hidden_size"] = heads * rng.choice([8, 16, 32])
    if model_type == "mistral":
        cfg["sliding_window"] = None
    # attention_bias / mlp_bias on Llama or Qwen3 are refused (the Megatron build has no such
    # biases): tests/test_model_shape.py checks the refusal.
    return cfg


def _hf_model(cfg: dict):
    import torch
    import transformers

    conf_cls = transformers.AutoConfig.for_model(cfg["model_type"]).__class__
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    if cfg["model_type"] == "qwen2":
        kwargs.pop("head_dim", None)  # Qwen2 derives head_dim from hidden/heads
    with torch.device("meta"):
        return getattr(transformers, cfg["architectures"][0])(conf_cls(**kwargs))


def _expected_rank_params(model, cfg: dict, *, tp: int, pp: int, stage: int, divisible_by: int) -> int:
    """Per-rank parameters from the HF tensors, with Megatron's sharding rules spelled out."""
    layers = cfg["num_hidden_layers"]
    per = layers // pp
    lo, hi = stage * per, (stage + 1) * per
    mult = math.lcm(divisible_by, tp)  # model_shape.padded_vocab: what the build pads to
    vpad = -(-cfg["vocab_size"] // mult) * mult
    first, last = stage == 0, stage == pp - 1
    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if "embed_tokens" in name:
            rows = vpad // tp * p.shape[1]
            total += rows if first else 0
            if cfg["tie_word_embeddings"] and last and pp > 1:
                total += rows  # last stage's copy of the tied embedding
            continue
        if "lm_head" in name:
            total += vpad // tp * p.shape[1] if last else 0
            continue
        if name == "model.norm.weight":
            total += n if last else 0
            continue
        idx = int(name.split(".")[2])
        if not (lo <= idx < hi):
            continue
        col = any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        row_w = any(k in name for k in ("o_proj.weight", "down_proj.weight"))
        if col or row_w:
            assert n % tp == 0
            total += n // tp  # column-parallel weights and biases, row-parallel weights
        else:
            total += n  # norms (incl. q/k norm) and row-parallel biases are replicated
    return total


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama", "mistral"])
def test_params_match_hf_and_sharding(model_type, rng_seed):
    rng = random.Random(rng_seed)
    for _ in range(3):
        cfg = _random_config(rng, model_type)
        if model_type == "qwen2":
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
            cfg["hidden_size"] = cfg["head_dim"] * cfg["num_attention_heads"]
        model = _hf_model(cfg)
        hf_total = sum(p.numel() for p in model.parameters())  # tied weights counted once
        shape = model_shape(cfg)
        assert shape.total_params() == hf_total, cfg
        for tp in [t for t in (1, 2, 4) if cfg["num_key_value_heads"] % t == 0 and cfg["intermediate_size"] % t == 0]:
            for pp in [p for p in (1, 2, 3) if cfg["num_hidden_layers"] % p == 0]:
                div = rng.choice([1, 8, 128])
                dp = rng.randint(1, 4)
                plan = plan_layout(cfg, tp=tp, pp=pp, dp=dp, seq_len=64, micro_batch_size=1,
                                   vocab_divisible_by=div, distributed_optimizer=True)
                mult = math.lcm(div, tp)
                assert plan.padded_vocab % mult == 0 and 0 <= plan.padded_vocab - cfg["vocab_size"] < mult
                for st in plan.stages:
                    want = _expected_rank_params(model, cfg, tp=tp, pp=pp, stage=st.stage, divisible_by=div)
                    assert st.params == want, (cfg, tp, pp, st.stage)
                    assert st.param_bytes == 2 * want and st.grad_bytes == 4 * want
                    assert st.optim_bytes_plain == 12 * want
                    assert st.optim_bytes == st.optim_bytes_distributed == -(-12 * want // dp)


def test_qwen3_8b_hand_arithmetic(repo_root):
    cfg = json.loads((repo_root / "recipes/models/qwen3-8b.json").read_text())
    h, i, L, V, d = 4096, 12288, 36, 151936, 128
    layer = h * (32 * d + 2 * 8 * d) + 32 * d * h + 3 * h * i + 2 * h + 2 * d
    total = L * layer + 2 * V * h + h
    plan = plan_layout(cfg, tp=2, pp=1, world_size=8, seq_len=2048, micro_batch_size=1)
    assert plan.total_params == total
    assert abs(total / 8.19e9 - 1) < 0.005
    vpad = 151936  # already a multiple of lcm(128, 2) = 128
    per_rank = L * ((h * (32 * d + 2 * 8 * d) + 32 * d * h + 3 * h * i) // 2 + 2 * h + 2 * d) + 2 * vpad // 2 * h + h
    w = plan.worst_stage
    assert plan.padded_vocab == vpad and plan.dp == 4
    assert w.params == per_rank
    assert w.param_bytes == 2 * per_rank and w.grad_bytes == 4 * per_rank
    assert w.optim_bytes == 12 * per_rank / 4 and w.optim_bytes_plain == 12 * per_rank
    # The paper's layout: 18 bytes/param without the distributed optimizer, 6 + 12/dp with it.
    assert abs((w.param_bytes + w.grad_bytes + w.optim_bytes) / (per_rank * (6 + 12 / 4)) - 1) < 1e-9


def test_pipeline_stages_and_tied_embeddings(repo_root):
    cfg = json.loads((repo_root / "recipes/models/qwen3-1.7b.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    one = plan_layout(cfg, tp=1, pp=1, seq_len=128, micro_batch_size=1)
    two = plan_layout(cfg, tp=1, pp=2, seq_len=128, micro_batch_size=1)
    emb = 151936 * 2048
    assert one.stages[0].params == one.total_params  # tied: one copy when pp=1
    # pp=2: the last stage holds a copy of the tied embedding as its LM head.
    assert sum(s.params for s in two.stages) == one.total_params + emb
    assert two.stages[0].has_embedding and not two.stages[0].has_lm_head and two.stages[1].has_lm_head


def test_fp32_and_optimizer_sharding(repo_root, rng_seed):
    cfg = json.loads((repo_root / "recipes/models/qwen3-14b.json").read_text())
    dp = random.Random(rng_seed).choice([1, 2, 3, 5, 8])
    p32 = plan_layout(cfg, tp=4, pp=2, dp=dp, seq_len=512, micro_batch_size=1, dtype="fp32",
                      distributed_optimizer=False)
    for s in p32.stages:
        assert s.param_bytes == 4 * s.params and s.grad_bytes == 4 * s.params
        assert s.optim_bytes == s.optim_bytes_plain == 8 * s.params
        assert s.optim_bytes_distributed == -(-8 * s.params // dp)


def test_activation_arithmetic(repo_root):
    cfg = json.loads((repo_root / "recipes/models/qwen3-8b.json").read_text())
    h, d, nq, nkv, inter, L, t = 4096, 128, 32, 8, 12288, 36, 2
    s, b, pp, M = 2048, 2, 2, 8
    per_tok = 8 * h + (2 * (nq + 2 * nkv) * d + 2 * (nq + nkv) * d + 2 * nq * d + 4 * nq + 6 * inter) / t
    plan = plan_layout(cfg, tp=t, pp=pp, dp=1, seq_len=s, micro_batch_size=b, num_microbatches=M)
    first = plan.stages[0]
    assert first.inflight_microbatches == pp and plan.stages[1].inflight_microbatches == 1
    want = s * b * ((L // pp) * per_tok + 2 * h) * pp
    assert first.act_bytes_by_recompute["none"] == int(want)
    sp = plan_layout(cfg, tp=t, pp=pp, dp=1, seq_len=s, micro_batch_size=b, num_microbatches=M,
                     sequence_parallel=True)
    a, c = first.act_bytes_by_recompute, sp.stages[0].act_bytes_by_recompute
    assert c["none"] < a["none"] and c["full"] < a["full"] < a["selective"] <= a["none"]
    unfused = plan_layout(cfg, tp=t, pp=pp, dp=1, seq_len=s, micro_batch_size=b, num_microbatches=M,
                          attention="unfused").stages[0].act_bytes_by_recompute
    assert unfused["none"] > unfused["selective"] == a["selective"]
    last = plan.stages[-1]
    assert last.loss_bytes_materialised == s * b * (plan.padded_vocab // t) * 10
    from megatron_sz.kernels._common import default_chunk_rows
    from megatron_sz.planner import FUSED_CHUNK_MIB

    v_loc = plan.padded_vocab // t
    os.environ.pop("MEGATRON_SZ_KERNEL_CHUNK_MB", None)
    rows = min(s * b, default_chunk_rows(v_loc, torch.device("cuda")))   # the GPU chunk of the kernels
    # per token lse + target logit, plus one fp32 logits chunk (FUSED_CHUNK_MIB, 128-row aligned there)
    assert FUSED_CHUNK_MIB == 640
    assert abs(last.loss_bytes_fused - (s * b * 8 + rows * v_loc * 4)) <= 128 * v_loc * 4
    assert plan.stages[0].loss_bytes_materialised == 0
    # Interleaving raises the first stage's in-flight activations by 1 + (pp-1)/(pp*vpp).
    vp = plan_layout(cfg, tp=t, pp=pp, dp=1, seq_len=s, micro_batch_size=b, num_microbatches=M, virtual_pp=3)
    ratio = vp.stages[0].act_bytes_by_recompute["none"] / a["none"]
    assert abs(ratio - (1 + (pp - 1) / (pp * 3))) < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(tp=3), "num_attention_heads=32 is not divisible by tp=3"),
    (dict(tp=16), "num_key_value_heads=8"),
    (dict(pp=5), "num_hidden_layers=36 is not divisible by pp=5"),
    (dict(tp=2, pp=2, world_size=6), "world size 6 is not divisible by tp\\*pp"),
    (dict(tp=1, sequence_parallel=True), "sequence_parallel needs tp >= 2"),
    (dict(tp=2, sequence_parallel=True, seq_len=2047), "divisible by tp=2"),
    (dict(tp=2, world_size=8, dp=2), "disagrees"),
    (dict(tp=2, dp=4, micro_batch_size=3, global_batch_size=64), "not divisible by micro_batch_size\\*dp"),
    (dict(pp=2, virtual_pp=4), "pp\\*virtual_pp"),
    (dict(vocab_divisible_by=0), "vocab_divisible_by"),
])
def test_refuses_impossible_layouts(repo_root, kwargs, match):
    cfg = json.loads((repo_root / "recipes/models/qwen3-8b.json").read_text())
    args = dict(seq_len=2048, micro_batch_size=1)
    args.update(kwargs)
    with pytest.raises(LayoutError, match=match) as info:
        plan_layout(cfg, **args)
    assert "layout." in str(info.value)  # names the field


def test_refuses_unsupported_models():
    with pytest.raises(LayoutError, match="mixture-of-experts"):
        check_model_layout({"model_type": "qwen3_moe", "num_experts": 8}, tp=1, pp=1)
    with pytest.raises(LayoutError, match="unsupported model_type"):
        check_model_layout({"model_type": "gpt2"}, tp=1, pp=1)
    with pytest.raises(LayoutError, match="hidden_size"):
        check_model_layout({"model_type": "llama", "hidden_size": "big"}, tp=1, pp=1)


def test_padded_vocab():
    # lcm(divisible_by, tp): independent of TP for power-of-two TP, so checkpoints move between TP sizes
    assert padded_vocab(151936, tp=1, divisible_by=128) == 151936
    assert padded_vocab(151936, tp=2, divisible_by=128) == 151936
    assert padded_vocab(151936, tp=8, divisible_by=128) == 151936
    assert padded_vocab(151937, tp=8, divisible_by=128) == 152064
    assert padded_vocab(517, tp=3, divisible_by=128) == 768
    assert padded_vocab(500, tp=2, divisible_by=1) == 500
    assert padded_vocab(501, tp=2, divisible_by=1) == 502


def test_cli_json_and_refusal(repo_root, capsys):
    model = str(repo_root / "recipes/models/qwen3-32b.json")
    rc = main(["plan", "--model", model, "--tp", "4", "--pp", "2", "--world-size", "16", "--seq", "4096",
               "--mbs", "1", "--gbs", "64", "--recompute", "full", "--sequence-parallel", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layout"]["dp"] == 2 and doc["layout"]["num_microbatches"] == 32
    per = doc["per_gpu"]
    assert per["grad_bytes"] == 2 * per["param_bytes"] and per["optim_bytes"] == 3 * per["param_bytes"]
    assert abs(per["total_gib"] * GiB - per["total_bytes"]) < 1
    rc = main(["plan", "--model", model, "--tp", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "tp=3" in err and "fix:" in err
    rc = main(["plan", "--model", model, "--tp", "8", "--pp", "4", "--world-size", "16"])
    assert rc == 2 and "world size 16" in capsys.readouterr().err


def test_cli_recipe_text(capsys):
    rc = main(["plan", "recipes/qwen3-8b-solver-tp2-8gpu.yaml", "--role", "solver", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert rc == 0
    for needle in ("tp=2 pp=1 dp=4", "parameters (bf16)", "gradients (fp32 main_grad)", "distributed, /dp=4",
                   "recompute=full", "materialised logits", "fits"):
        assert needle in out, needle
    rc = main(["plan", "recipes/qwen3-8b-solver-tp2-8gpu.yaml", "--role", "solver", "--tp", "3"])
    assert rc == 2 and "not divisible by tp=3" in capsys.readouterr().err


def test_planner_imports_no_torch_or_megatron():
    code = ("import sys, megatron_sz.planner, megatron_sz.model_shape, megatron_sz.cli.plan; "
            "bad = [m for m in ('torch', 'megatron', 'megatron.core', 'transformers') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_plan_covers_every_training_job_of_each_system():
    """`plan RECIPE` sizes the jobs the system's round plan trains, for every system."""
    from megatron_sz.cli.plan import training_jobs
    from megatron_sz.recipe import load_recipe
    from megatron_sz.systems import all_systems

    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for system in all_systems():
        recipe = load_recipe(root / system.default_recipe)
        jobs = training_jobs(recipe)
        assert jobs, f"{system.name}: no training job declared by its stages"
        for role, spec, kind, section, train in jobs:
            assert role in system.roles and train.micro_batch_size >= 1, (system.name, kind, section)


def test_cli_plans_packed_rows(tmp_path, capsys):
    """batching: packed plans one micro-batch as one packed row of pack_length tokens
    (default: max_length per sequence of an item, so 2 x 2048 for a DPO pair)."""
    import yaml

    src = yaml.safe_load(open("recipes/qwen3-8b-solver-tp2-8gpu.yaml"))
    src["solver"]["dpo"]["batching"] = "packed"
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(src))
    rc = main(["plan", str(path), "--role", "solver", "--job", "solver-dpo", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "packed rows of 4096 tokens" in out and "seq=4096 mbs=1" in out
