"""What ``predict`` returns: label names, probabilities and uncertainty per image (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Predictions"]


@dataclass
class Predictions:
    """A batch of predictions; every array has the batch as its first axis."""

    labels: list[str]  # predicted label names (or indices as strings when the config has no names)
    label_ids: np.ndarray  # (B,) int64
    confidence: np.ndarray  # (B,) probability of the predicted label
    probs: np.ndarray  # (B, K)
    entropy: np.ndarray  # (B,) total uncertainty, nats
    expected_entropy: np.ndarray  # (B,) aleatoric
    mutual_information: np.ndarray  # (B,) epistemic
    disagreement: np.ndarray  # (B,) share of members disagreeing with the ensemble's top-1

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray], label_names: list[str] | None) -> Predictions:
        probs = np.asarray(outputs["probs"])
        ids = probs.argmax(-1).astype(np.int64)
        return cls(
            labels=[label_names[i] if label_names else str(i) for i in ids],
            label_ids=ids,
            confidence=probs[np.arange(len(ids)), ids],
            probs=probs,
            entropy=np.asarray(outputs["entropy"]),
            expected_entropy=np.asarray(outputs["expected_entropy"]),
            mutual_information=np.asarray(outputs["mutual_information"]),
            disagreement=np.asarray(outputs["disagreement"]),
        )

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per image."""
        return [
            {
                "label": self.labels[i],
                "label_id": int(self.label_ids[i]),
                "confidence": float(self.confidence[i]),
                "entropy": float(self.entropy[i]),
                "expected_entropy": float(self.expected_entropy[i]),
                "mutual_information": float(self.mutual_information[i]),
                "disagreement": float(self.disagreement[i]),
            }
            for i in range(len(self.labels))
        ]
