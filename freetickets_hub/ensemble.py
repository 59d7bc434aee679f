"""``EnsembleModel``: M members of one timm architecture, saved compactly and loaded strictly."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import architectures as _architectures  # noqa: F401  (registers the CIFAR-style WRNs with timm)
from .config import CalibrationConfig, EnsembleConfig
from .errors import ArtifactError, ConfigError
from .files import atomic_path, write_text_atomic
from .hub import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, resolve_file
from .masks import decode_member, encode_member
from .model_card import render_model_card
from .outputs import EnsembleOutput, combine_member_logits
from .predictions import Predictions
from .preprocessing import ImageInput, preprocess

__all__ = ["EnsembleModel"]

logger = logging.getLogger(__name__)


class EnsembleModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    pipeline_tag="image-classification",
    tags=["ensemble", "sparse", "uncertainty-estimation", "model-calibration", "timm", "freetickets"],
):
    """A sparse (or dense) deep ensemble whose prediction is the mean of its members' softmax.

    Args:
        config: architecture, labels, preprocessing and the ``ensemble`` block (see DESIGN.md).

    Example:
        >>> from freetickets_hub import EnsembleConfig, EnsembleModel
        >>> cfg = EnsembleConfig("cifar_wrn10_2", 10, model_args={"in_chans": 1},
        ...                      pretrained_cfg={"input_size": [1, 28, 28]}, ensemble={"num_members": 2})
        >>> model = EnsembleModel(cfg)
        >>> model(torch.zeros(4, 1, 28, 28)).probs.shape
        torch.Size([4, 10])
    """

    def __init__(self, config: EnsembleConfig | dict) -> None:
        super().__init__()
        self.config = config if isinstance(config, EnsembleConfig) else EnsembleConfig.from_dict(config)
        try:
            self.members = nn.ModuleList(
                timm.create_model(
                    self.config.architecture, pretrained=False, num_classes=self.config.num_classes, **self.config.model_args
                )
                for _ in range(self.config.ensemble.num_members)
            )
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ConfigError(f"cannot build architecture {self.config.architecture!r}: {err}") from err
        # masks[i][name]: which entries of member i's weight `name` may be nonzero; dense layers have none
        self.masks: list[dict[str, torch.Tensor]] = [{} for _ in self.members]
        self.eval()

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def temperature(self) -> float:
        return self.config.ensemble.temperature

    def set_temperature(self, temperature: float, *, fit_on: str) -> None:
        """Store a fitted temperature; every output applies it from now on."""
        self.config.ensemble.calibration = CalibrationConfig(temperature=float(temperature), fit_on=fit_on)

    def load_member(self, index: int, state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        """Load member ``index`` strictly and record its masks (weights outside a mask must be zero)."""
        self.members[index].load_state_dict(state_dict, strict=True)
        for name, mask in masks.items():
            weight = state_dict[name]
            if mask.shape != weight.shape:
                raise ArtifactError(f"member {index}: mask of {name} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
            if torch.count_nonzero(weight.detach().cpu()[~mask.cpu().bool()]):
                raise ArtifactError(f"member {index}: {name} has nonzero weights outside its mask")
        self.masks[index] = {name: mask.detach().cpu().bool() for name, mask in masks.items()}

    def member_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw logits of every member, ``(M, B, K)``."""
        return torch.stack([member(pixel_values) for member in self.members])

    def forward(self, pixel_values: torch.Tensor) -> EnsembleOutput:
        return combine_member_logits(self.member_logits(pixel_values), self.temperature)

    @torch.inference_mode()
    def predict(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 64) -> Predictions:
        """Classify PIL images, uint8 arrays or image files, with uncertainty.

        Preprocessing follows the config's ``pretrained_cfg`` (timm's evaluation transform).
        """
        pixels = preprocess(images, self.config.pretrained_cfg)
        device = next(self.parameters()).device
        chunks: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(pixels), batch_size):
            out = self(torch.from_numpy(pixels[start : start + batch_size]).to(device))
            for key in ("probs", "entropy", "expected_entropy", "mutual_information", "disagreement"):
                chunks.setdefault(key, []).append(getattr(out, key).float().cpu().numpy())
        merged = {key: np.concatenate(parts) for key, parts in chunks.items()}
        return Predictions.from_outputs(merged, self.config.label_names)

    # ----- saving -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, *, values_dtype: str = "float32", **kwargs) -> str | None:  # type: ignore[override]
        """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` to a folder.

        Args:
            save_directory: the folder (created if needed).
            values_dtype: dtype of the stored sparse values: "float32", "float16" or "bfloat16".
        """
        self._values_dtype = values_dtype
        return super().save_pretrained(save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        values_dtype = getattr(self, "_values_dtype", "float32")
        tensors: dict[str, torch.Tensor] = {}
        for index, member in enumerate(self.members):
            tensors.update(encode_member(index, member.state_dict(), self.masks[index], values_dtype=values_dtype))
        metadata = {"format": "pt", "library": LIBRARY_NAME, "values_dtype": values_dtype}
        with atomic_path(save_directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        write_text_atomic(save_directory / CONFIG_NAME, self.config.to_json())
        write_text_atomic(save_directory / "README.md", str(self.generate_model_card(save_directory=save_directory)))

    def generate_model_card(self, *args, save_directory: Path | None = None, **kwargs) -> ModelCard:
        return render_model_card(self, save_directory)

    # ----- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> EnsembleModel:
        """Load an ensemble from a local folder or a Hub repo id, strictly (safetensors + JSON only).

        Raises:
            ConfigError: ``config.json`` is malformed or has impossible values.
            ArtifactError: a tensor is missing, extra, mis-shaped or the file is corrupt.
        """
        download = dict(
            revision=revision, cache_dir=cache_dir, force_download=force_download, token=token, local_files_only=local_files_only
        )
        config = EnsembleConfig.from_json_file(str(resolve_file(pretrained_model_name_or_path, CONFIG_NAME, **download)))
        weights = resolve_file(pretrained_model_name_or_path, WEIGHTS_NAME, **download)
        model = cls(config)
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"cannot read {weights}: {err} (is the file truncated or corrupt?)") from err
        used: set[str] = set()
        for index, member in enumerate(model.members):
            state, masks, consumed = decode_member(index, tensors, member.state_dict())
            model.load_member(index, state, masks)
            used |= consumed
        extra = sorted(set(tensors) - used)
        if extra:
            raise ArtifactError(f"{weights} holds tensors this config does not expect: {extra[:5]}")
        return model.to(map_location).eval()
