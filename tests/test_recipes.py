"""Model recipes: they load and validate; typos name the key and the closest valid one;
wrong types and impossible layouts are refused at load; config paths resolve."""
import json
import shutil

import pytest

from megatron_sz.errors import LayoutError, RecipeError
from megatron_sz.model_shape import check_model_layout
from megatron_sz.planner import plan_layout
from megatron_sz.recipe import load_recipe

MODEL_RECIPES = ["tiny-cpu.yaml", "qwen3-8b-solver-tp2-8gpu.yaml", "qwen3-14b-solver.yaml",
                 "qwen3-32b-generator-tp4-pp2.yaml"]


@pytest.mark.parametrize("name", MODEL_RECIPES)
def test_model_recipes_load_and_plan(name, repo_root):
    r = load_recipe(repo_root / "recipes" / name)
    for role in ("solver", "generator"):
        spec = getattr(r, role).model
        if spec.config is not None:
            assert isinstance(spec.config, dict) and spec.config_path
            assert spec.config == json.loads(open(spec.config_path).read())
        cfg = spec.hf_config(r)  # hf_path is not on this machine: falls back to the packaged config
        par = getattr(r, role).parallel
        train = r.solver.dpo if role == "solver" else r.generator.wsft
        plan = plan_layout(cfg, tp=par.tp, pp=par.pp, world_size=par.world_size, seq_len=train.max_length,
                           micro_batch_size=train.micro_batch_size, global_batch_size=train.global_batch_size,
                           sequence_parallel=par.sequence_parallel, recompute=par.recompute,
                           distributed_optimizer=par.use_distributed_optimizer)
        if getattr(r, role).parallel.world_size >= 8:  # the GPU recipes fit an 80 GiB GPU
            assert plan.worst_stage.total_bytes < 76 * 2**30, (name, role)


def test_paper_layouts():
    r8 = load_recipe("recipes/qwen3-8b-solver-tp2-8gpu.yaml")
    assert (r8.solver.parallel.tp, r8.solver.parallel.pp, r8.solver.parallel.world_size) == (2, 1, 8)
    r32 = load_recipe("recipes/qwen3-32b-generator-tp4-pp2.yaml")
    assert (r32.generator.parallel.tp, r32.generator.parallel.pp) == (4, 2)
    assert r32.generator.model.config["num_hidden_layers"] == 64


def test_tiny_model_suits_cpu_and_splits(repo_root):
    cfg = json.loads((repo_root / "recipes/models/tiny-cpu.json").read_text())
    assert cfg["num_hidden_layers"] <= 4 and cfg["hidden_size"] <= 128
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        check_model_layout(cfg, tp=tp, pp=pp)
    import torch
    import transformers

    conf = transformers.Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = transformers.Qwen3ForCausalLM(conf)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    logits = model(torch.randint(0, cfg["vocab_size"], (1, 16))).logits
    assert logits.shape == (1, 16, cfg["vocab_size"])


def _write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def _copy_recipe(tmp_path, repo_root, name="qwen3-8b-solver-tp2-8gpu.yaml"):
    import yaml

    return yaml.safe_load((repo_root / "recipes" / name).read_text())


def test_nested_typo_names_key_and_suggests(tmp_path, repo_root):
    import yaml

    data = _copy_recipe(tmp_path, repo_root)
    data["solver"]["parallel"]["sequence_paralel"] = data["solver"]["parallel"].pop("sequence_parallel")
    p = _write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(RecipeError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert "solver.parallel.sequence_paralel" in msg and "did you mean 'sequence_parallel'" in msg
    assert str(p) in msg
    data = _copy_recipe(tmp_path, repo_root)
    data["solver"]["model"]["make_vocab_size_divisble_by"] = 128
    with pytest.raises(RecipeError, match="did you mean 'make_vocab_size_divisible_by'"):
        load_recipe(_write(tmp_path, yaml.safe_dump(data)))


def test_wrong_type_names_field(tmp_path, repo_root):
    import yaml

    data = _copy_recipe(tmp_path, repo_root)
    data["solver"]["parallel"]["tp"] = "two"
    with pytest.raises(RecipeError, match="solver.parallel.tp must be an integer"):
        load_recipe(_write(tmp_path, yaml.safe_dump(data)))
    data = _copy_recipe(tmp_path, repo_root)
    data["solver"]["model"]["config"] = 42
    with pytest.raises(RecipeError, match="solver.model.config"):
        load_recipe(_write(tmp_path, yaml.safe_dump(data)))


@pytest.mark.parametrize("role, parallel, err, match", [
    ("solver", dict(tp=3, gpus_per_node=6), LayoutError, "num_attention_heads=32 is not divisible by tp=3"),
    ("solver", dict(pp=5, tp=1, gpus_per_node=5), LayoutError, "num_hidden_layers=36 is not divisible by pp=5"),
    ("solver", dict(tp=4, gpus_per_node=6), RecipeError, "world size 6"),
    ("generator", dict(tp=16, nodes=2, gpus_per_node=8), LayoutError, "num_key_value_heads=8"),
])
def test_impossible_layout_refused_at_load(tmp_path, repo_root, role, parallel, err, match):
    import yaml

    data = _copy_recipe(tmp_path, repo_root)
    data[role].setdefault("parallel", {}).update(parallel)
    data[role]["parallel"]["sequence_parallel"] = False
    with pytest.raises(err, match=match) as info:
        load_recipe(_write(tmp_path, yaml.safe_dump(data)))
    assert f"{role}.parallel" in str(info.value)


def test_sequence_parallel_without_tp(tmp_path):
    p = _write(tmp_path, "solver:\n  model: {config: models/tiny-cpu.json}\n"
                         "  parallel: {tp: 1, sequence_parallel: true}\n")
    with pytest.raises(RecipeError, match="sequence_parallel' needs tp >= 2"):
        load_recipe(p)


def test_config_path_relative_to_recipe_then_packaged(tmp_path, repo_root):
    (tmp_path / "models").mkdir()
    own = json.loads((repo_root / "recipes/models/tiny-cpu.json").read_text())
    own["num_hidden_layers"] = 2
    (tmp_path / "models" / "mine.json").write_text(json.dumps(own))
    p = _write(tmp_path, "solver:\n  model: {config: models/mine.json}\n"
                         "generator:\n  model: {config: models/qwen3-1.7b.json}\n")
    r = load_recipe(p)
    assert r.solver.model.config["num_hidden_layers"] == 2
    assert r.solver.model.config_path == str(tmp_path / "models" / "mine.json")
    assert r.generator.model.config["hidden_size"] == 2048  # packaged recipes/models/
    p = _write(tmp_path, "solver:\n  model: {config: models/nope.json}\n")
    with pytest.raises(RecipeError, match="model config file not found: models/nope.json"):
        load_recipe(p)
    shutil.rmtree(tmp_path / "models")
