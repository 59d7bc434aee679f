"""``Predictions``: records with top-k, length, indexing (numpy only)."""

import numpy as np
import pytest

from freetickets_hub.uncertainty.predictions import Predictions


def _predictions() -> Predictions:
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32)
    zeros = np.zeros(2, dtype=np.float32)
    outputs = {"probs": probs, "entropy": zeros + 1, "expected_entropy": zeros, "mutual_information": zeros + 1}
    return Predictions.from_outputs({**outputs, "disagreement": zeros}, ["a", "b", "c"])


def test_top_k_records_are_sorted_by_probability() -> None:
    records = _predictions().to_records(top_k=2)
    assert [r["label"] for r in records] == ["b", "a"]
    assert [t["label"] for t in records[0]["top_k"]] == ["b", "c"]
    assert records[1]["top_k"][1] == {"label": "c", "label_id": 2, "probability": pytest.approx(0.3)}
    assert "abstain" not in records[0] and "prediction_set" not in records[0]


@pytest.mark.parametrize("top_k", [0, 4, 1.5, True])
def test_top_k_out_of_range_is_refused(top_k: object) -> None:
    with pytest.raises(ValueError, match="top_k must be an integer from 1 to 3"):
        _predictions().to_records(top_k=top_k)  # type: ignore[arg-type]


def test_len_and_indexing_keep_every_field() -> None:
    predictions = _predictions()
    predictions.abstain = np.array([False, True])
    predictions.prediction_sets = [[1], [0, 2]]
    assert len(predictions) == 2
    second = predictions[1]
    assert len(second) == 1 and second.labels == ["a"] and second.probs.shape == (1, 3)
    assert second.to_records()[0]["abstain"] is True
    assert second.to_records()[0]["prediction_set"] == ["a", "c"]
    assert predictions[::-1].labels == ["a", "b"]
