"""The one data room: the validation carve a run holds out, pinned to the indices it always had."""

from __future__ import annotations

from freetickets_hub.evaluation.data import validation_carve


def test_the_validation_carve_keeps_its_indices() -> None:
    """Recorded from the carve before it moved to ``freetickets_hub.data``: a run's held-out rows never change."""
    val, train = validation_carve(50, 7, 3)
    assert val.tolist() == [36, 4, 27, 3, 32, 35, 6]
    assert train.tolist()[:10] == [1, 2, 34, 44, 11, 31, 14, 7, 24, 45]
    assert sorted(val.tolist() + train.tolist()) == list(range(50))
    val, train = validation_carve(60000, 5000, 0)  # the shipped fashion-MNIST recipes' carve
    assert val[:8].tolist() == [36044, 10678, 57327, 55074, 21567, 15479, 9481, 43095]
    assert train[:8].tolist() == [11331, 41365, 15227, 3162, 10062, 11464, 5135, 46495]
    assert (int(val.sum()), int(train.sum())) == (149911330, 1650058670)
