"""The one data room: the validation carve a run holds out, pinned to the indices it always had."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from freetickets_hub.data import Carve, run_validation_rows, validation_carve
from freetickets_hub.training.data import ImageSplit, load_image_data
from freetickets_hub.training.recipe import load_recipe


def test_the_validation_carve_keeps_its_indices() -> None:
    """Recorded from the carve before it moved to ``freetickets_hub.data``: a run's held-out rows never change."""
    train, val = validation_carve(50, 7, 3)
    assert val.tolist() == [36, 4, 27, 3, 32, 35, 6]
    assert train.tolist()[:10] == [1, 2, 34, 44, 11, 31, 14, 7, 24, 45]
    assert sorted(val.tolist() + train.tolist()) == list(range(50))
    train, val = validation_carve(60000, 5000, 0)  # the shipped fashion-MNIST recipes' carve
    assert val[:8].tolist() == [36044, 10678, 57327, 55074, 21567, 15479, 9481, 43095]
    assert train[:8].tolist() == [11331, 41365, 15227, 3162, 10062, 11464, 5135, 46495]
    assert (int(val.sum()), int(train.sum())) == (149911330, 1650058670)


def test_the_carve_names_its_parts() -> None:
    carve = validation_carve(10, 3, 0)
    assert isinstance(carve, Carve) and (len(carve.train), len(carve.val)) == (7, 3)


@pytest.mark.parametrize("excluded", [[], ["square"]])
def test_a_runs_validation_rows_are_found_again_from_its_recipe(tiny_dataset: Path, excluded: list[str]) -> None:
    """``calibrate --split validation`` and the demo read exactly the images the trainer held out, also
    when the run dropped classes before carving (the carve then indexes the rows that are left)."""
    recipe = load_recipe(None, [f"dataset={tiny_dataset}", "val_size=12", "seed=3", f"exclude_classes={excluded}"])
    held_out = load_image_data(recipe).val
    assert held_out is not None and isinstance(held_out, ImageSplit)
    rows = run_validation_rows(recipe.to_dict())
    assert len(rows) == 12
    source = datasets.load_dataset(str(tiny_dataset), split="train").with_format("numpy")
    images = torch.from_numpy(np.stack([source[i]["image"] for i in rows])).unsqueeze(1)
    assert torch.equal(images, held_out.images)
    names = source.features["label"].names
    kept = [name for name in names if name not in excluded]
    assert [kept.index(names[int(source[i]["label"])]) for i in rows] == held_out.labels.tolist()


def test_published_files_name_a_local_dataset_by_its_last_part(tmp_path: Path) -> None:
    from freetickets_hub.data import public_dataset

    (tmp_path / "fmnist").mkdir()
    assert public_dataset(str(tmp_path / "fmnist")) == "fmnist"
    assert public_dataset(str(tmp_path / "fmnist") + "/") == "fmnist"
    assert public_dataset("${FREETICKETS_DATASETS}/fashion_mnist") == "fashion_mnist"
    assert public_dataset("zalando-datasets/fashion_mnist") == "zalando-datasets/fashion_mnist"  # a Hub id
