"""Recipes are validated strictly and every key can be overridden with --set."""

from __future__ import annotations

from pathlib import Path

import pytest

from freetickets_hub.errors import RecipeError
from freetickets_hub.training.phases import plan_runs
from freetickets_hub.training.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "training" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_bundled_recipes_load(path: Path) -> None:
    recipe = load_recipe(path)
    assert plan_runs(recipe)


def test_tiny_recipe_is_edst_m3_s08() -> None:
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "training/recipes/fmnist_tiny_edst.yaml")
    assert (recipe.method, recipe.num_members, recipe.sparsity) == ("edst", 3, 0.8)


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("method: edst\nsparsty: 0.9\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'sparsty' \(did you mean 'sparsity'\?\)"):
        load_recipe(path)


def test_wrong_type_and_impossible_values() -> None:
    with pytest.raises(RecipeError, match="'num_members' must be of type int"):
        load_recipe(None, ["num_members=three"])
    with pytest.raises(RecipeError, match="'sparsity' must be in"):
        load_recipe(None, ["sparsity=1.0"])
    with pytest.raises(RecipeError, match="'growth' must be one of"):
        load_recipe(None, ["growth=magic"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["sparsity"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


def test_overrides_are_yaml_typed() -> None:
    recipe = load_recipe(
        None, ["max_train_samples=100", "lr=1", "refine_lrs=[0.1, 0.01]", "model_args={drop_rate: 0.1}"]
    )
    assert recipe.max_train_samples == 100
    assert recipe.lr == 1.0 and isinstance(recipe.lr, float)
    assert recipe.refine_lrs == [0.1, 0.01]
    assert recipe.model_args == {"drop_rate": 0.1}


def test_edst_plan_has_exploration_then_m_refinements_with_escapes() -> None:
    recipe = load_recipe(
        None, ["num_members=3", "explore_epochs=4", "refine_epochs=2", "lr=0.1", "refine_lrs=[0.01, 0.001]"]
    )
    (run,) = plan_runs(recipe)
    names = [p.name for p in run.phases]
    assert names == ["explore", "refine 1/3", "refine 2/3", "refine 3/3"]
    assert [p.ticket for p in run.phases] == [False, True, True, True]
    assert [p.escape_before for p in run.phases] == [False, False, True, True]
    refine = run.phases[2]
    assert refine.lr_at(0.0, 0) == 0.01 and refine.lr_at(0.49, 0) == 0.01 and refine.lr_at(0.5, 0) == 0.001
    assert run.phases[0].lr_at(0.9, 3) == 0.1  # LR reset: every refinement starts at 0.01 again


def test_dst_plan_is_m_seeded_runs() -> None:
    recipe = load_recipe(None, ["method=dst", "num_members=2", "epochs=4", "seed=7"])
    runs = plan_runs(recipe)
    assert [r.seed for r in runs] == [7, 8]
    assert runs[0].phases[0].lr_at(0.8, 3) == pytest.approx(0.001)


def test_string_keys_keep_yaml_booleans_as_text() -> None:
    assert load_recipe(None, ["mixed_precision=no"]).mixed_precision == "no"  # YAML 1.1 would read False
    assert load_recipe(None, ["mixed_precision='no'"]).mixed_precision == "no"
    assert load_recipe(None, ["escape_growth=random"]).escape_growth == "random"
    assert load_recipe(None, ["escape_growth=null"]).escape_growth is None


def test_warmup_ramps_linearly_within_the_first_epochs() -> None:
    recipe = load_recipe(None, ["method=dst", "num_members=1", "epochs=10", "warmup_epochs=2", "lr=0.1"])
    phase = plan_runs(recipe)[0].phases[0]
    assert phase.lr_at(0.0, 0.0) == pytest.approx(0.1 * 1e-3 / 2)
    assert phase.lr_at(0.05, 0.5) == pytest.approx(0.1 * (0.5 + 1e-3) / 2)
    assert phase.lr_at(0.15, 1.5) == pytest.approx(0.1 * (1.5 + 1e-3) / 2)
    assert phase.lr_at(0.2, 2.0) == pytest.approx(0.1)
