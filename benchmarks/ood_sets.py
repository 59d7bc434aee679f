"""The image sets of the OOD benchmark: one suite of OOD sets, and what every run with one recipe seed shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freetickets_hub.evaluation.ood_suite import SHIFTS, SYNTHETIC, shifted_images, synthetic_images
from freetickets_hub.training.data import ImageData

__all__ = ["OodSet", "SeedGroup", "suite"]


@dataclass(frozen=True)
class OodSet:
    """Images the model should flag, and which kind of shift they stand for (far / shifted / near)."""

    name: str
    kind: str
    images: torch.Tensor  # (N, C, H, W) uint8 at the model's input size


def suite(inside: torch.Tensor, near: torch.Tensor, count: int, seed: int, digits: torch.Tensor | None) -> list[OodSet]:
    """The suite around ``inside``: held-out classes, digits (test time only), synthetic and shifted images."""
    shape = tuple(inside.shape[1:])
    sets = [OodSet("held-out classes", "near", near)]
    if digits is not None:
        sets.append(OodSet("sklearn:digits", "far", digits))
    sets += [OodSet(f"synthetic:{name}", "far", synthetic_images(name, count, shape, seed=seed)) for name in SYNTHETIC]
    sets += [OodSet(f"shift:{name}", "shifted", shifted_images(name, inside[:count], seed=seed)) for name in SHIFTS]
    return sets


@dataclass
class SeedGroup:
    """The data every run with one recipe seed shares: its validation carve, the test split, both suites."""

    data: ImageData
    test_sets: list[OodSet]
    val_sets: list[OodSet]
