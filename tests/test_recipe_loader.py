"""Recipe loading: unknown keys suggest the closest valid key; types and ranges are checked."""
import pytest

from megatron_sz.errors import RecipeError
from megatron_sz.recipe import DPOSpec, from_dict, load_recipe, recipe_to_dict


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_nested_key_names_path_and_suggests(tmp_path):
    p = _write(tmp_path, "solver:\n  dpo:\n    betta: 0.1\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert "solver.dpo.betta" in msg and "'beta'" in msg and str(p) in msg


def test_bad_literal_suggests_choice(tmp_path):
    p = _write(tmp_path, "solver:\n  dpo:\n    loss_type: sigmod\n")
    with pytest.raises(RecipeError, match=r"solver.dpo.loss_type.*did you mean 'sigmoid'"):
        load_recipe(p)


@pytest.mark.parametrize("text,needle", [
    ("rounds: three\n", "rounds must be an integer"),
    ("solver:\n  dpo:\n    beta: -1\n", "'beta' must be > 0"),
    ("solver:\n  parallel:\n    tp: 3\n    gpus_per_node: 8\n", "not divisible"),
    ("solver: [1, 2]\n", "solver must be a mapping"),
    ("curriculum:\n  replay_ratio: 1.5\n", "replay_ratio"),
])
def test_type_and_range_errors(tmp_path, text, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(_write(tmp_path, text))


def test_invalid_yaml_names_line(tmp_path):
    p = _write(tmp_path, "name: x\nsolver:\n  dpo: {beta: 0.1\n")
    with pytest.raises(RecipeError, match=r"r.yaml:\d+"):
        load_recipe(p)


def test_defaults_and_round_trip(tmp_path):
    p = _write(tmp_path, "name: t\nsolver:\n  dpo:\n    beta: 0.05\n    lr_unused: 1\n")
    with pytest.raises(RecipeError):
        load_recipe(p)
    r = load_recipe(_write(tmp_path, "name: t\nsolver:\n  dpo:\n    beta: 0.05\n    optim: {lr: 2e-6}\n"))
    assert r.solver.dpo.beta == 0.05 and r.solver.dpo.optim.lr == 2e-6
    assert isinstance(r.solver.dpo, DPOSpec)
    again = from_dict(DPOSpec, recipe_to_dict(r.solver.dpo))
    assert again == r.solver.dpo


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
