"""Recipes are validated strictly and every key can be overridden with --set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freetickets_hub.errors import RecipeError
from freetickets_hub.training.finetune_recipe import FineTuneRecipe
from freetickets_hub.training.phases import Phase, plan_runs
from freetickets_hub.training.recipe import Recipe, load_recipe
from freetickets_hub.training.sparsity import SparsityConfig

RECIPES = sorted(  # fine-tuning recipes (finetune_*.yaml) are another schema: tests/test_finetune.py
    p
    for p in (Path(__file__).resolve().parents[1] / "training" / "recipes").glob("*.yaml")
    if not p.name.startswith("finetune_")
)


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
    # the LR reset: the phase before an escape ends at the last refine LR, the one after starts at the first
    assert run.phases[1].lr_at(0.999, 1.998) == 0.001 and refine.lr_at(0.0, 0.0) == 0.01


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


RECIPE_DIR = Path(__file__).resolve().parents[1] / "training" / "recipes"


def _lr_at_epoch(phase: Phase, epoch: float) -> float:
    return phase.lr_at(epoch / phase.epochs, epoch)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["", "_45k"])
def test_paper_cifar_edst_recipe(dataset: str, split: str) -> None:
    """450 epochs = 150 + 3 x 100 (50 at 0.01, 50 at 0.001); WRN-28-10, S=0.8, ERK, RigL, ΔT 1000, p 0.5, q 0.8."""
    recipe = load_recipe(RECIPE_DIR / f"{dataset}_wrn28_10_edst{split}.yaml")
    assert (recipe.method, recipe.architecture, recipe.num_members) == ("edst", "cifar_wrn28_10", 3)
    assert (recipe.sparsity, recipe.distribution, recipe.growth) == (0.8, "erk", "gradient")
    assert (recipe.update_interval, recipe.prune_rate, recipe.prune_rate_schedule) == (1000, 0.5, "constant")
    assert (recipe.escape_rate, recipe.regrow_pruned) == (0.8, True)
    assert (recipe.batch_size, recipe.lr, recipe.momentum, recipe.weight_decay) == (128, 0.1, 0.9, 5e-4)
    assert (recipe.augment, recipe.pad, recipe.filter_bias_and_bn) == ("pad_crop_flip", 4, False)
    (run,) = plan_runs(recipe)
    assert [p.epochs for p in run.phases] == [150, 100, 100, 100] and sum(p.epochs for p in run.phases) == 450
    explore, *refines = run.phases
    assert _lr_at_epoch(explore, 0) == _lr_at_epoch(explore, 149.99) == 0.1
    for phase in refines:
        assert _lr_at_epoch(phase, 0) == _lr_at_epoch(phase, 49.99) == 0.01
        assert _lr_at_epoch(phase, 50) == _lr_at_epoch(phase, 99.99) == 0.001
    assert [p.escape_before for p in run.phases] == [False, False, True, True]
    expected = (5000, "best_val") if split else (0, "last")  # the official 45k/5k split, or all 50k images
    assert (recipe.val_size, recipe.ticket_selection) == expected


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["", "_45k"])
def test_paper_cifar_dst_recipe(dataset: str, split: str) -> None:
    """M=3 runs of 250 epochs, LR 0.1, x0.1 at epochs 125 and 187."""
    recipe = load_recipe(RECIPE_DIR / f"{dataset}_wrn28_10_dst{split}.yaml")
    assert (recipe.method, recipe.num_members, recipe.epochs, recipe.sparsity) == ("dst", 3, 250, 0.8)
    assert (recipe.update_interval, recipe.prune_rate, recipe.batch_size, recipe.weight_decay) == (1000, 0.5, 128, 5e-4)
    runs = plan_runs(recipe)
    assert [r.seed for r in runs] == [0, 1, 2]
    (phase,) = runs[0].phases
    lrs = {epoch: _lr_at_epoch(phase, epoch) for epoch in (0, 124.99, 125, 186.99, 187, 249.99)}
    assert lrs[0] == lrs[124.99] == 0.1
    assert lrs[125] == lrs[186.99] == pytest.approx(0.01)
    assert lrs[187] == lrs[249.99] == pytest.approx(0.001)
    assert (recipe.val_size, recipe.ticket_selection) == ((5000, "best_val") if split else (0, "last"))


def test_45k_recipes_differ_from_the_paper_recipes_only_in_the_split() -> None:
    for path in RECIPE_DIR.glob("*_45k.yaml"):
        plain = load_recipe(path.with_name(path.name.replace("_45k", ""))).to_dict()
        differ = {k for k, v in load_recipe(path).to_dict().items() if plain[k] != v}
        assert differ == {"val_size", "ticket_selection"}, path.name


def test_paper_imagenet_recipe() -> None:
    """ResNet-50: 30 + 4 x 70 epochs, M=4, ΔT 4000, warm-up 5, label smoothing 0.1, refine LR 30/30/10."""
    recipe = load_recipe(RECIPE_DIR / "imagenet_resnet50_edst.yaml")
    assert (recipe.architecture, recipe.num_members, recipe.sparsity, recipe.update_interval) == (
        "resnet50",
        4,
        0.8,
        4000,
    )
    assert (recipe.lr, recipe.warmup_epochs, recipe.label_smoothing, recipe.batch_size) == (0.1, 5, 0.1, 128)
    assert (recipe.weight_decay, recipe.filter_bias_and_bn, recipe.color_jitter) == (1e-4, True, 0.0)
    assert (recipe.prune_rate_schedule, recipe.prune_rate, recipe.prune_rate_final) == ("cosine", 0.5, 0.005)
    (run,) = plan_runs(recipe)
    assert [p.epochs for p in run.phases] == [30, 70, 70, 70, 70] and sum(p.epochs for p in run.phases) == 310
    assert run.phases[0].warmup_epochs == 5 and all(p.warmup_epochs == 0 for p in run.phases[1:])
    steps_per_epoch = 10009  # ImageNet at batch 128: the LR must step exactly at the epoch boundary
    for phase in run.phases[1:]:
        for epoch, before, after in ((30, 0.01, 0.001), (60, 0.001, 0.0001)):
            step = epoch * steps_per_epoch
            assert _lr_at_epoch(phase, (step - 1) / steps_per_epoch) == before
            assert _lr_at_epoch(phase, step / steps_per_epoch) == after
    # the prune-rate cosine runs once over exploration + refinement 1 and restarts after each escape
    assert [p.prune_cycle_epochs for p in run.phases] == [100, None, 70, 70, 70]
    phase_cycles = plan_runs(load_recipe(RECIPE_DIR / "imagenet_resnet50_edst.yaml", ["prune_rate_restart=phase"]))
    assert [p.prune_cycle_epochs for p in phase_cycles[0].phases] == [30, 70, 70, 70, 70]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=dst", "epochs=250", "lr_milestones=[125, 187]"], r"write \[0\.5, 0\.748\]"),
        (["lr_milestones=[0.75, 0.5]"], "strictly increasing fractions of 'epochs'"),
        (["lr_milestones=[0.0, 0.5]"], r"in \(0, 1\)"),
        (["lr_milestones=[0.5, 1.0]"], r"in \(0, 1\)"),
        (["refine_lr_milestones=[50]", "refine_epochs=100"], r"write \[0\.5\]"),
        (["refine_lr_milestones=[0.3, 0.6]"], "one milestone per LR after the first"),
    ],
)
def test_lr_milestones_must_be_fractions(overrides: list[str], message: str) -> None:
    """The paper writes milestones in epochs; a recipe that did would silently train at the first LR."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_refine_lr_milestones_and_the_even_split() -> None:
    even = plan_runs(load_recipe(None, ["refine_lrs=[0.01, 0.001, 0.0001]"]))[0].phases[1]
    assert even.lrs == [(0.0, 0.01), (1 / 3, 0.001), (2 / 3, 0.0001)]
    recipe = load_recipe(None, ["refine_lrs=[0.01, 0.001, 0.0001]", "refine_lr_milestones=[0.25, 0.5]"])
    assert plan_runs(recipe)[0].phases[1].lrs == [(0.0, 0.01), (0.25, 0.001), (0.5, 0.0001)]


SHIPPED = json.loads((Path(__file__).parent / "shipped_recipes.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_recipe_loads_to_the_values_it_always_had(name: str) -> None:
    """Recorded before training and fine-tuning recipes got one base: the same keys, the same values.

    A key added later (with a default) is allowed; a lost one is not, and a changed one only in the commit
    that changes it on purpose and says why (finetune_small's augment and LRs, issue 26).
    """
    expected = SHIPPED[name]
    cls = {"Recipe": Recipe, "FineTuneRecipe": FineTuneRecipe}[expected["class"]]
    values = load_recipe(Path("training/recipes") / name, cls=cls).to_dict()
    assert {key: values.get(key, "<missing>") for key in expected["values"]} == expected["values"]


def test_timm_augmentation_without_an_image_size_fails_when_the_recipe_loads() -> None:
    with pytest.raises(RecipeError, match=r"augment 'timm' needs `image_size`"):
        load_recipe(None, ["augment=timm", "dataset=/nowhere"])
    assert load_recipe(None, ["augment=timm", "image_size=32"]).image_size == 32


def test_both_recipes_check_their_shared_keys_with_the_same_rules() -> None:
    for cls in (Recipe, FineTuneRecipe):
        with pytest.raises(RecipeError, match=r"recipe key 'prune_rate' must be in \[0, 1\], got 1.5"):
            load_recipe(None, ["prune_rate=1.5"], cls=cls)
        with pytest.raises(RecipeError, match=r"recipe key 'augment' must be one of"):
            load_recipe(None, ["augment=flip"], cls=cls)
        with pytest.raises(RecipeError, match=r"recipe key 'batch_size' must be at least 1, got 0"):
            load_recipe(None, ["batch_size=0"], cls=cls)
    with pytest.raises(RecipeError, match=r"recipe key 'epochs' must be at least 1, got 0"):
        FineTuneRecipe(epochs=0)
    with pytest.raises(RecipeError, match=r"unknown recipe key 'sparsity'"):  # a training-only key
        load_recipe(None, ["sparsity=0.5"], cls=FineTuneRecipe)
    with pytest.raises(RecipeError, match=r"recipe key 'sparsity' must be in \[0, 1\), got 1.0"):
        Recipe(sparsity=1.0)


def test_the_sparsity_defaults_are_declared_once() -> None:
    assert Recipe().sparsity_config() == SparsityConfig()
