"""The engine contract (``Engine``), and ``GraphEngine``: what every engine of an exported graph shares.

An engine declares its interface (``input_spec``: one image input of a fixed ``(C, H, W)`` and
dtype; ``output_specs``: the DESIGN.md outputs by name, dtype and shape), runs preprocessed pixels
(``__call__``) and turns images into ``Predictions`` (``predict``), as KServe's ``Model`` declares
its types: the service serves any engine by these. ``GraphEngine`` checks its graph against
``config.json`` when it is built, checks each batch before running it, and has the one ``predict``
loop; a backend (ONNX Runtime, OpenVINO) supplies only how the graph is loaded and run (``_run``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.names import METADATA_NUM_MEMBERS, METADATA_TEMPERATURE, OUTPUT_NAMES
from freetickets_hub.engines.preprocessing import ImageInput, batch_starts, check_pixel_shape, preprocess
from freetickets_hub.errors import ArtifactError
from freetickets_hub.uncertainty.predictions import Predictions

__all__ = ["PREDICT_OUTPUTS", "Engine", "GraphEngine", "TensorSpec", "output_specs"]

logger = logging.getLogger(__name__)

PREDICT_OUTPUTS = tuple(name for name in OUTPUT_NAMES if name not in ("logits", "member_probs"))  # what predict reads
INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}  # numpy -> Open Inference Protocol
_MEMBER_AXIS_OUTPUTS = ("member_probs",)  # (M, B, K): the batch is axis 1; every other output is batch-first


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an engine's interface: its name, OIP datatype, shape (-1: the batch) and batch axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    batch_axis: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def output_specs(config: EnsembleConfig, names: Sequence[str]) -> list[TensorSpec]:
    """The declared outputs ``names`` of an ensemble engine: float32, ``(B, K)`` logits and probs,
    ``(M, B, K)`` member_probs, ``(B,)`` the uncertainties."""
    num_classes, num_members = config.num_classes, config.ensemble.num_members
    shapes = {"logits": (-1, num_classes), "probs": (-1, num_classes), "member_probs": (num_members, -1, num_classes)}
    return [
        TensorSpec(name, "FP32", shapes.get(name, (-1,)), 1 if name in _MEMBER_AXIS_OUTPUTS else 0) for name in names
    ]


class Engine(Protocol):
    """What the service (and any caller) needs of an engine, whatever runs it (ONNX Runtime, OpenVINO, torch)."""

    config: EnsembleConfig

    @property
    def providers(self) -> list[str]: ...

    @property
    def input_spec(self) -> TensorSpec: ...

    @property
    def output_specs(self) -> list[TensorSpec]: ...

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]: ...

    def predict(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 64) -> Predictions: ...


class GraphEngine:
    """An exported ensemble graph behind one interface: ``__call__`` on pixels, ``predict`` on images.

    Subclasses set ``config``, ``input_name``, ``input_dtype``, ``input_shape`` and ``output_names``,
    call :meth:`_check_graph` once loaded, and implement :meth:`_run`.
    """

    config: EnsembleConfig
    input_name: str
    input_dtype: np.dtype
    input_shape: tuple[int, int, int]  # (C, H, W) that ``pixel_values`` must have
    output_names: list[str]

    @property
    def providers(self) -> list[str]:
        """Where the graph runs (ONNX Runtime's execution providers, or OpenVINO's device)."""
        raise NotImplementedError

    @property
    def input_spec(self) -> TensorSpec:
        """The graph's input: its name, datatype and ``(-1, C, H, W)``."""
        return TensorSpec(self.input_name, DATATYPES[self.input_dtype], (-1, *self.input_shape))

    @property
    def output_specs(self) -> list[TensorSpec]:
        """The graph's outputs, in its order (checked to include what ``predict`` reads)."""
        return output_specs(self.config, self.output_names)

    def _run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on checked, contiguous ``pixel_values``; the outputs by name."""
        raise NotImplementedError

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run the ensemble on preprocessed ``pixel_values`` ``(B, C, H, W)``.

        Returns:
            The DESIGN.md outputs by name: ``logits``, ``probs``, ``member_probs`` ``(M, B, K)``,
            ``entropy``, ``expected_entropy``, ``mutual_information``, ``disagreement``.

        Raises:
            TypeError: ``pixel_values`` is not a numpy array.
            ValueError: wrong dtype, rank, channels, height/width, an empty batch, or NaN/inf values.
        """
        return self._run(np.ascontiguousarray(self._check_pixels(pixel_values)))

    def predict(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 64) -> Predictions:
        """Classify PIL images, uint8 arrays or image files, with uncertainty, as ``EnsembleModel.predict``."""
        pixels = preprocess(images, self.config.pretrained_cfg).astype(self.input_dtype)
        chunks: dict[str, list[np.ndarray]] = {key: [] for key in PREDICT_OUTPUTS}
        for start in batch_starts(len(pixels), batch_size):
            out = self(pixels[start : start + batch_size])
            for key in PREDICT_OUTPUTS:
                chunks[key].append(out[key])
        if not len(pixels):  # an empty list of images: an empty result
            chunks = {
                key: [np.zeros((0, self.config.num_classes) if key == "probs" else 0, np.float32)] for key in chunks
            }
        merged = {key: np.concatenate(parts) for key, parts in chunks.items()}
        return Predictions.from_outputs(merged, self.config.label_names, self.config.ensemble.selective)

    def _check_graph(
        self, graph_path: str | os.PathLike[str], input_shape: Sequence[Any], metadata: Mapping[str, str]
    ) -> None:
        """The graph must have one float image input, the outputs ``predict`` reads and the config's temperature."""
        shape = list(input_shape)
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or self.input_dtype not in INPUT_DTYPES:
            raise ArtifactError(f"{graph_path}: expected a float input (B, C, H, W), got {self.input_dtype} {shape}")
        input_size = tuple(self.config.pretrained_cfg.get("input_size", shape[1:]))
        if tuple(shape[1:]) != input_size:
            raise ArtifactError(f"{graph_path} takes input (C, H, W) {tuple(shape[1:])}, config.json says {input_size}")
        missing = [name for name in PREDICT_OUTPUTS if name not in self.output_names]
        if missing:
            raise ArtifactError(f"{graph_path} lacks the outputs {missing} (has {self.output_names}); re-export it")
        if METADATA_TEMPERATURE not in metadata:
            logger.warning("%s has no %s metadata: cannot check its temperature", graph_path, METADATA_TEMPERATURE)
            return
        graph_temperature = float(metadata[METADATA_TEMPERATURE])
        if not math.isclose(graph_temperature, self.config.ensemble.temperature, rel_tol=1e-6):
            raise ArtifactError(
                f"{graph_path} was exported with temperature {graph_temperature}, but config.json has "
                f"{self.config.ensemble.temperature}; re-run `freetickets export onnx` after calibrating"
            )
        members = int(metadata.get(METADATA_NUM_MEMBERS, self.config.ensemble.num_members))
        if members != self.config.ensemble.num_members:
            raise ArtifactError(
                f"{graph_path} holds {members} members, config.json {self.config.ensemble.num_members}; re-export it"
            )

    def _check_pixels(self, pixel_values: Any) -> np.ndarray:
        if not isinstance(pixel_values, np.ndarray):
            raise TypeError(f"pixel_values must be a numpy array, got {type(pixel_values).__name__}")
        dtype = self.input_dtype
        if pixel_values.dtype != dtype:
            raise ValueError(
                f"pixel_values must be {dtype.name}, got {pixel_values.dtype}; "
                f"convert with pixel_values.astype(np.{dtype.name})"
            )
        check_pixel_shape(pixel_values.shape, self.input_shape)
        bad = int(pixel_values.size - np.count_nonzero(np.isfinite(pixel_values)))
        if bad:
            raise ValueError(f"pixel_values contains {bad} NaN or infinite value(s)")
        return pixel_values
