"""One model shape, one rule set: what `plan` accepts builds, what it refuses the builder refuses.

* every family `plan` accepts (Qwen3, Qwen2, Llama with llama3 RoPE scaling, Mistral
  without sliding window) passes the planner's layout check and builds with the Megatron
  adapter on CPU at TP=1 and TP=2, with logits equal to transformers';
* every refused family or feature is refused by `plan` and by `build_model` with the
  same message, naming the same config key;
* the TP / KV-head rule is the same in `plan`, recipe loading, pre-flight and the builder.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from megatron_sz.errors import LayoutError, UserError
from megatron_sz.megatron.testing import LLAMA3_ROPE, make_tiny_hf_model
from megatron_sz.model_shape import FAMILIES, model_shape, read_hf_config
from megatron_sz.planner import plan_layout

TOL = 1e-4
SEQ = 24
# Every family in the registry, with its awkward variant (vocab 301 needs padding, GQA).
ACCEPTED = {
    "qwen3": dict(kind="qwen3"),
    "qwen2": dict(kind="qwen2", tied=True),
    "llama_rope_scaled": dict(kind="llama", rope_scaling=LLAMA3_ROPE),
    "mistral": dict(kind="mistral"),
}


def test_every_family_has_a_build_case():
    assert {kw["kind"] for kw in ACCEPTED.values()} == set(FAMILIES)


def _message(err: UserError) -> str:
    """The message without its ``where:`` prefix (callers name the config differently)."""
    text = str(err)
    return text[len(err.where) + 2:] if err.where else text


def _build_worker(rank, world, dirs, ids):
    import megatron_sz.megatron as mm

    out = {}
    for tp in (1, 2):
        mm.initialize_parallel(tp, 1)
        for name, d in dirs.items():
            chunks = mm.build_model(d, init_weights=False)
            mm.load_hf_weights(chunks, d)
            with torch.no_grad():
                out[(name, tp)] = mm.forward_logits(chunks[0], ids)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_sz.dist import spawn

    base = tmp_path_factory.mktemp("model_shape")
    seed = int.from_bytes(os.urandom(4), "little") % (2 ** 31)
    print(f"[seed] model shape builds: {seed}")
    dirs = {name: str(make_tiny_hf_model(base / name, seed=seed + i, **kw)) for i, (name, kw) in
            enumerate(ACCEPTED.items())}
    ids = torch.randint(0, 301, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    refs = {}
    for name, d in dirs.items():
        with torch.no_grad():
            refs[name] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(input_ids=ids).logits
    return dict(dirs=dirs, refs=refs, got=spawn(_build_worker, 2, dirs, ids)[0])


@pytest.mark.parametrize("name", list(ACCEPTED))
@pytest.mark.parametrize("tp", [1, 2])
def test_accepted_family_plans_and_builds(built, name, tp):
    cfg = read_hf_config(built["dirs"][name])
    plan = plan_layout(cfg, tp=tp, pp=1, seq_len=SEQ)  # the planner's layout check passes...
    assert plan.model.model_type == ACCEPTED[name]["kind"]
    ref, got = built["refs"][name], built["got"][(name, tp)]  # ...and the adapter builds it, exactly
    assert got.shape == ref.shape and ref.std() > 0.5
    assert (got - ref).abs().max().item() <= TOL


def _base(model_type: str = "llama") -> dict:
    arch = FAMILIES[model_type].architecture
    return {"model_type": model_type, "architectures": [arch], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 301, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "rope_theta": 10000.0}


REFUSED = [
    ("llama", {"model_type": "qwen3_moe", "architectures": None}, "model_type", "mixture-of-experts"),
    ("llama", {"model_type": "mixtral", "architectures": None}, "model_type", "mixture-of-experts"),
    ("llama", {"model_type": "glm4", "architectures": None}, "model_type", "GLM-4 is not supported yet"),
    ("llama", {"model_type": "gpt2", "architectures": None}, "model_type", "unsupported model_type"),
    ("llama", {"architectures": ["Qwen3ForCausalLM"]}, "architectures", "does not match"),
    ("qwen3", {"num_experts": 8}, "num_experts", "mixture-of-experts"),
    ("qwen2", {"moe_intermediate_size": 32}, "moe_intermediate_size", "mixture-of-experts"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act", "SiLU"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window", "sliding-window"),
    ("llama", {"use_sliding_window": True}, "use_sliding_window", "sliding-window"),
    ("mistral", {"sliding_window": 4096}, "sliding_window", "sliding-window"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types", "full attention"),
    ("llama", {"mlp_bias": True}, "mlp_bias", "biases in the MLP"),
    ("llama", {"attention_bias": True}, "attention_bias", "bias on the q/k/v/o"),
    ("qwen3", {"attention_bias": True}, "attention_bias", "bias on the q/k/v/o"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor", "partial rotary"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling", "yarn"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor", "needs"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads", "not a multiple"),
    ("llama", {"head_dim": None, "hidden_size": 66}, "head_dim", "not divisible"),
    ("llama", {"vocab_size": 0}, "vocab_size", "positive integer"),
    ("llama", {"num_hidden_layers": "two"}, "num_hidden_layers", "positive integer"),
]


@pytest.mark.parametrize("family,changes,key,needle", REFUSED, ids=[f"{c[0]}-{c[2]}" for c in REFUSED])
def test_refused_by_plan_and_builder_alike(family, changes, key, needle):
    import megatron_sz.megatron as mm

    cfg = {k: v for k, v in {**_base(family), **changes}.items() if v is not None}  # None: key removed
    with pytest.raises(LayoutError) as planned:
        plan_layout(cfg, tp=1, pp=1, seq_len=SEQ)
    with pytest.raises(LayoutError) as building:
        mm.build_model(copy.deepcopy(cfg), tp=1, pp=1)  # refused before any Megatron object exists
    assert needle in str(planned.value)
    assert _message(planned.value) == _message(building.value)
    assert planned.value.where.endswith(key) and building.value.where.endswith(key)
    assert planned.value.fix and building.value.fix


def test_mistral_without_window_is_llama_shaped():
    a = model_shape({**_base("mistral"), "sliding_window": None})
    b = model_shape(_base("llama"))
    assert {**a.to_dict(), "model_type": "llama"} == b.to_dict()


# --------------------------------------------------------------------------- TP / KV heads


def _tp_outcome(fn) -> str | None:
    try:
        fn()
    except LayoutError as err:
        return _message(err)
    return None


TP_KV = [(heads, kv, tp) for heads, kv in ((8, 8), (8, 4), (8, 2), (8, 1), (12, 6), (12, 3))
         for tp in (1, 2, 3, 4, 8)]


@pytest.mark.parametrize("heads,kv,tp", TP_KV)
def test_tp_kv_rule_is_one_rule(heads, kv, tp, repo_root):
    import megatron_sz.megatron as mm
    from megatron_sz.executor.preflight import check_layout as preflight_layout
    from megatron_sz.recipe import load_recipe

    cfg = {**_base("qwen3"), "num_attention_heads": heads, "num_key_value_heads": kv,
           "intermediate_size": 48 * 8 * 3}
    planned = _tp_outcome(lambda: plan_layout(cfg, tp=tp, pp=1, seq_len=SEQ))
    loaded = _tp_outcome(lambda: load_recipe(repo_root / "recipes/tiny-cpu.yaml", overrides={
        "solver.model.config": cfg, "solver.parallel.tp": tp, "solver.parallel.gpus_per_node": tp}))
    recipe = load_recipe(repo_root / "recipes/tiny-cpu.yaml", overrides={"solver.model.config": cfg})
    recipe.solver.parallel.tp = recipe.solver.parallel.gpus_per_node = tp
    checked = _tp_outcome(lambda: preflight_layout(recipe, "solver"))
    try:
        mm.build_model(cfg, tp=tp, pp=1)
        raise AssertionError("build_model ran without a parallel state")
    except LayoutError as err:
        # (a parallel state left by another test: the model's rules passed, the world's did not)
        built = None if "but the parallel state is" in str(err) else _message(err)
    except RuntimeError as err:  # passed the layout rules; stops for want of a world
        assert "initialize_parallel" in str(err)
        built = None
    expected_ok = heads % tp == 0 and kv % tp == 0
    assert (planned is None) == expected_ok, planned
    assert planned == loaded == checked == built
    if not expected_ok:
        assert f"tp={tp}" in planned and "use tp in" in planned


def test_layout_rules_name_the_field():
    m = model_shape(_base("llama"))
    from megatron_sz.model_shape import check_layout

    cases = [
        (dict(tp=1, pp=3), "recipe: solver.parallel.pp", "num_hidden_layers=2 is not divisible by pp=3"),
        (dict(tp=1, pp=2, vpp=2), "recipe: solver.parallel.virtual_pp", "pp*virtual_pp"),
        (dict(tp=1, pp=1, vpp=2), "recipe: solver.parallel.virtual_pp", "need pp >= 2"),
        (dict(tp=1, pp=1, sequence_parallel=True), "recipe: solver.parallel.sequence_parallel", "tp >= 2"),
        (dict(tp=2, pp=1, sequence_parallel=True, seq_len=7), "recipe: solver.parallel.seq_len", "divisible"),
        (dict(tp=1, pp=1, vocab_divisible_by=0), "recipe: solver.parallel.vocab_divisible_by", "positive"),
    ]
    for kw, where, needle in cases:
        with pytest.raises(LayoutError) as info:
            check_layout(m, where="recipe: solver.parallel", **kw)
        assert info.value.where == where and needle in str(info.value) and info.value.fix, kw
    check_layout(m, tp=2, pp=2, sequence_parallel=True, seq_len=8, where="x")


def test_mistral_converts_both_ways(tmp_path):
    """hf -> mcore -> hf is lossless for the newly accepted family (config without architectures too)."""
    import json

    from safetensors.torch import load_file

    from megatron_sz.megatron.convert import hf_to_mcore, mcore_to_hf

    src = make_tiny_hf_model(tmp_path / "hf", "mistral", seed=3, num_layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("architectures")
    (src / "config.json").write_text(json.dumps(cfg))
    hf_to_mcore(src, tmp_path / "mcore", tp=1, pp=1, progress=False)
    back = mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
