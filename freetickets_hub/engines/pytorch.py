"""``TorchEngine``: an ``EnsembleModel`` behind the engine contract (numpy in, numpy out), for serving."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from freetickets_hub.artifact.names import INPUT_NAME, OUTPUT_NAMES
from freetickets_hub.engines.base import TensorSpec, output_specs
from freetickets_hub.engines.preprocessing import ImageInput
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.predictions import Predictions

__all__ = ["TorchEngine"]


class TorchEngine:
    """``model`` on its device: preprocessed float32 ``pixel_values`` in, the DESIGN.md outputs as numpy out.

    Args:
        model: the ensemble (its device is where the batches run).
    """

    def __init__(self, model: EnsembleModel) -> None:
        self.model = model.eval()
        self.config = model.config
        self._device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, repo_or_dir: str, *, device: str | None = None) -> TorchEngine:
        """Load ``repo_or_dir`` on ``device`` (default: the GPU when there is one)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(EnsembleModel.from_pretrained(repo_or_dir, map_location=device))

    @property
    def providers(self) -> list[str]:
        return []  # ONNX Runtime's notion; PyTorch runs on the model's device

    @property
    def input_spec(self) -> TensorSpec:
        channels, height, width = self.config.pretrained_cfg["input_size"]
        return TensorSpec(INPUT_NAME, "FP32", (-1, channels, height, width))

    @property
    def output_specs(self) -> list[TensorSpec]:
        return output_specs(self.config, OUTPUT_NAMES)

    @torch.inference_mode()
    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        out = self.model(torch.from_numpy(pixel_values).to(self._device))
        return {name: t.float().cpu().numpy() for name, t in zip(OUTPUT_NAMES, out.to_tuple(), strict=True)}

    def predict(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 64) -> Predictions:
        return self.model.predict(images, batch_size=batch_size)
