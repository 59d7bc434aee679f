"""What ``predict`` returns: label names, probabilities and uncertainty per image (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from freetickets_hub.artifact.config import SelectiveConfig
from freetickets_hub.uncertainty.selective import decide

__all__ = ["Predictions"]


@dataclass
class Predictions:
    """A batch of predictions; every array has the batch as its first axis.

    ``abstain`` and ``prediction_sets`` are present only when the model carries a
    selective-prediction calibration (``config.ensemble.selective``); otherwise they are ``None``.
    """

    labels: list[str]  # predicted label names (or indices as strings when the config has no names)
    label_ids: np.ndarray  # (B,) int64
    confidence: np.ndarray  # (B,) probability of the predicted label
    probs: np.ndarray  # (B, K)
    entropy: np.ndarray  # (B,) total uncertainty, nats
    expected_entropy: np.ndarray  # (B,) aleatoric
    mutual_information: np.ndarray  # (B,) epistemic
    disagreement: np.ndarray  # (B,) share of members disagreeing with the ensemble's top-1
    label_names: list[str] | None = None  # the model's label names, for top-k and prediction sets
    abstain: np.ndarray | None = None  # (B,) bool: the model declines to answer
    prediction_sets: list[list[int]] | None = None  # per image, the label ids of its conformal set

    @classmethod
    def from_outputs(
        cls,
        outputs: dict[str, np.ndarray],
        label_names: list[str] | None,
        selective: SelectiveConfig | None = None,
    ) -> Predictions:
        """Predictions from an engine's outputs; a ``selective`` rule (``config.ensemble.selective``)
        fills ``abstain`` and ``prediction_sets`` through :func:`freetickets_hub.uncertainty.selective.decide`."""
        probs = np.asarray(outputs["probs"])
        ids = probs.argmax(-1).astype(np.int64)
        abstain, prediction_sets = decide(outputs, selective)
        return cls(
            labels=[label_names[i] if label_names else str(i) for i in ids],
            label_ids=ids,
            confidence=probs[np.arange(len(ids)), ids],
            probs=probs,
            entropy=np.asarray(outputs["entropy"]),
            expected_entropy=np.asarray(outputs["expected_entropy"]),
            mutual_information=np.asarray(outputs["mutual_information"]),
            disagreement=np.asarray(outputs["disagreement"]),
            label_names=label_names,
            abstain=abstain,
            prediction_sets=prediction_sets,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | slice | np.ndarray | list[int]) -> Predictions:
        """The predictions of some images, as a ``Predictions`` (an int keeps a batch of one)."""
        rows = np.arange(len(self))[index]
        rows = np.atleast_1d(rows)
        picked: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "label_names" or value is None:
                picked[field.name] = value
            elif isinstance(value, list):
                picked[field.name] = [value[i] for i in rows]
            else:
                picked[field.name] = value[rows]
        return Predictions(**picked)

    def _name(self, label_id: int) -> str:
        return self.label_names[label_id] if self.label_names else str(label_id)

    def to_records(self, top_k: int = 1) -> list[dict[str, Any]]:
        """One JSON-ready dict per image, with the ``top_k`` most probable labels.

        Raises:
            ValueError: ``top_k`` is not between 1 and the number of classes.
        """
        num_classes = self.probs.shape[-1]
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k must be an integer from 1 to {num_classes} (the number of classes), got {top_k!r}")
        order = np.argsort(-self.probs, axis=-1, kind="stable")[:, :top_k]
        records = []
        for i in range(len(self)):
            record: dict[str, Any] = {
                "label": self.labels[i],
                "label_id": int(self.label_ids[i]),
                "confidence": float(self.confidence[i]),
                "top_k": [
                    {"label": self._name(int(k)), "label_id": int(k), "probability": float(self.probs[i, k])}
                    for k in order[i]
                ],
                "entropy": float(self.entropy[i]),
                "expected_entropy": float(self.expected_entropy[i]),
                "mutual_information": float(self.mutual_information[i]),
                "disagreement": float(self.disagreement[i]),
            }
            if self.abstain is not None:
                record["abstain"] = bool(self.abstain[i])
            if self.prediction_sets is not None:
                record["prediction_set"] = [self._name(k) for k in self.prediction_sets[i]]
            records.append(record)
        return records
