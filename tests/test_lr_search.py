"""``finetune --search-lr``: the grid, the pick, determinism, and the validation carve as its only data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from freetickets_hub.cli import main
from freetickets_hub.errors import RecipeError
from freetickets_hub.training import lr_search
from freetickets_hub.training.finetune import FineTuneRecipe

from .conftest import write_image_dataset
from .conftest_hub import make_ensemble


def test_grid_scales_the_recipe_lrs_and_needs_a_validation_carve() -> None:
    grid = lr_search.candidates(FineTuneRecipe(lr=0.1, backbone_lr=0.01, val_size=10))
    assert [v for c in grid for v in (c.lr, c.backbone_lr)] == pytest.approx(
        [0.03, 0.006, 0.03, 0.03, 0.1, 0.02, 0.1, 0.1, 0.3, 0.06, 0.3, 0.3]
    )
    probe = lr_search.candidates(FineTuneRecipe(lr=0.1, backbone_lr=0.05, val_size=10, mode="linear-probe"))
    assert [v for c in probe for v in (c.lr, c.backbone_lr)] == pytest.approx([0.03, 0.03, 0.1, 0.05, 0.3, 0.05])
    with pytest.raises(RecipeError, match="validation carve: set val_size"):
        lr_search.candidates(FineTuneRecipe(val_size=0))


def test_pick_takes_the_lowest_nll_and_the_first_of_equals() -> None:
    a, b, c = (lr_search.Candidate(lr, lr) for lr in (0.1, 0.2, 0.3))
    assert lr_search.pick([(a, 0.5), (b, 0.4), (c, 0.4)]) == b
    assert lr_search.pick([(a, math.inf), (b, 0.9)]) == b


def test_short_runs_are_bounded() -> None:
    short = lr_search.search_recipe(FineTuneRecipe(epochs=10), lr_search.Candidate(0.3, 0.1))
    assert (short.epochs, short.warmup_epochs, short.lr, short.backbone_lr) == (2, 0, 0.3, 0.1)


def test_cli_refuses_search_without_a_validation_carve(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    make_ensemble(members=2).save_pretrained(base)
    data = write_image_dataset(tmp_path / "data")
    args = ["finetune", str(base), "--dataset", str(data), "--output-dir", str(tmp_path / "ft"), "--search-lr"]
    assert main([*args, "--set", "val_size=0"]) == 2
    assert "--search-lr picks on the validation carve" in capsys.readouterr().err
