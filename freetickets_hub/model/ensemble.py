"""``EnsembleModel``: M members of one timm architecture, saved compactly and loaded strictly."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from huggingface_hub import CommitInfo, ModelCard, PyTorchModelHubMixin
from torch import nn

from freetickets_hub.artifact.companions import companion_source, copy_companions, write_endpoint_files
from freetickets_hub.artifact.config import CalibrationConfig, EnsembleConfig
from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.artifact.hub import push_staged, resolve_file
from freetickets_hub.artifact.names import CONFIG_NAME, LIBRARY_NAME, README_NAME, WEIGHTS_NAME
from freetickets_hub.artifact.weights import (
    decode_members,
    encode_members,
    read_weights,
    stored_values_dtype,
    write_weights,
)
from freetickets_hub.engines.preprocessing import ImageInput, batch_starts, check_pixel_shape, preprocess
from freetickets_hub.errors import ArtifactError, ConfigError
from freetickets_hub.model import architectures as _architectures  # noqa: F401  (registers the CIFAR-style WRNs with timm)
from freetickets_hub.model.card import render_model_card
from freetickets_hub.model.widths import create_slim_model
from freetickets_hub.uncertainty.outputs import EnsembleOutput, combine_member_logits
from freetickets_hub.uncertainty.predictions import Predictions

__all__ = ["EnsembleModel"]

logger = logging.getLogger(__name__)

_UNCERTAINTY = ("entropy", "expected_entropy", "mutual_information", "disagreement")


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
        independent_init: give each member its own random init; False copies the first member's
            (faster when every weight is loaded right after, as ``from_pretrained`` does).

    Example:
        >>> from freetickets_hub import EnsembleConfig, EnsembleModel
        >>> cfg = EnsembleConfig("cifar_wrn10_2", 10, model_args={"in_chans": 1},
        ...                      pretrained_cfg={"input_size": [1, 28, 28]}, ensemble={"num_members": 2})
        >>> model = EnsembleModel(cfg)
        >>> model(torch.zeros(4, 1, 28, 28)).probs.shape
        torch.Size([4, 10])
    """

    def __init__(self, config: EnsembleConfig | dict, *, independent_init: bool = True) -> None:
        super().__init__()
        self.config = config if isinstance(config, EnsembleConfig) else EnsembleConfig.from_dict(config)
        info = self.config.ensemble
        first = self._build_member(info.widths_of(0))
        # copying one member costs a memory copy; a fresh random init costs a model build
        others = (
            copy.deepcopy(first)
            if not independent_init and info.widths_of(index) == info.widths_of(0)
            else self._build_member(info.widths_of(index))
            for index in range(1, info.num_members)
        )
        self.members = nn.ModuleList([first, *others])
        # masks[i][name]: which entries of member i's weight `name` may be nonzero; dense layers have none
        self.masks: list[dict[str, torch.Tensor]] = [{} for _ in self.members]
        # the folder this ensemble was loaded from (a local folder or a Hub cache snapshot), if any
        self.source_dir: Path | None = None
        # dtype the conv/linear weights were stored in; saving keeps it unless told otherwise
        self.values_dtype = "float32"
        self.eval()

    def _build_member(self, widths: dict[str, list[int]] | None) -> nn.Module:
        """One member: the timm architecture, rebuilt at ``widths`` for a slim member (``model.widths``)."""
        kwargs = {"num_classes": self.config.num_classes, **self.config.model_args}
        try:
            if widths is not None:
                return create_slim_model(self.config.architecture, widths, **kwargs)
            return timm.create_model(self.config.architecture, pretrained=False, **kwargs)
        except (RuntimeError, TypeError) as err:  # timm: "Unknown model (...)"; a bad model_args key
            raise ConfigError(f"cannot build architecture {self.config.architecture!r}: {err}") from err

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def temperature(self) -> float:
        return self.config.ensemble.temperature

    def set_temperature(self, temperature: float, *, fit_on: str) -> None:
        """Store a fitted temperature; every output applies it from now on.

        A stored selective rule (``config.ensemble.selective``) was fitted on the old temperature's
        outputs, so a new temperature drops it (with a warning): refit it with ``freetickets calibrate``.
        """
        if self.config.ensemble.selective is not None and float(temperature) != self.temperature:
            logger.warning("the stored selective rule was fitted on the old temperature's outputs; dropped it")
            self.config.ensemble.selective = None
        self.config.ensemble.calibration = CalibrationConfig(temperature=float(temperature), fit_on=fit_on)

    def load_member(self, index: int, state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        """Load member ``index`` strictly and record its masks (weights outside a mask must be zero)."""
        self.members[index].load_state_dict(state_dict, strict=True)
        for name, mask in masks.items():
            weight = state_dict[name]
            if mask.shape != weight.shape:
                raise ArtifactError(
                    f"member {index}: mask of {name} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}"
                )
            if torch.count_nonzero(weight.detach().cpu()[~mask.cpu().bool()]):
                raise ArtifactError(f"member {index}: {name} has nonzero weights outside its mask")
        self.masks[index] = {name: mask.detach().cpu().bool() for name, mask in masks.items()}

    def member_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw logits of every member, ``(M, B, K)``.

        Raises:
            TypeError: ``pixel_values`` is not a tensor.
            ValueError: not floating point, a shape other than the config's ``(B, C, H, W)``, an empty
                batch, or NaN/inf values (the checks and messages of ``OnnxEnsemble``).
        """
        self._check_pixels(pixel_values)
        return torch.stack([member(pixel_values) for member in self.members])

    def _check_pixels(self, pixel_values: Any) -> None:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return  # an export traces symbolic shapes: checking them would fix the dynamic batch
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be floating point, got {pixel_values.dtype}; predict() preprocesses images for you"
            )
        input_size = self.config.pretrained_cfg.get("input_size")
        if input_size:
            check_pixel_shape(pixel_values.shape, input_size)
        bad = int(pixel_values.numel() - torch.isfinite(pixel_values).sum())
        if bad:
            raise ValueError(f"pixel_values contains {bad} NaN or infinite value(s)")

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
        for start in batch_starts(len(pixels), batch_size):
            out = self(torch.from_numpy(pixels[start : start + batch_size]).to(device))
            for key in ("probs", *_UNCERTAINTY):
                chunks.setdefault(key, []).append(getattr(out, key).float().cpu().numpy())
        if not len(pixels):  # an empty list of images: an empty result
            chunks = {"probs": [np.zeros((0, self.config.num_classes), np.float32)]}
            chunks.update({key: [np.zeros(0, np.float32)] for key in _UNCERTAINTY})
        merged = {key: np.concatenate(parts) for key, parts in chunks.items()}
        return Predictions.from_outputs(merged, self.config.label_names, self.config.ensemble.selective)

    def export_member(self, index: int, save_directory: str | Path) -> Path:
        """Write member ``index`` as a plain dense timm folder (see :func:`.member.export_member`)."""
        from freetickets_hub.model.member import export_member

        return export_member(self, index, save_directory)

    # ----- persistence: the mixin's hooks, the file format in artifact/ ----------------------------------

    def _save_pretrained(
        self,
        save_directory: Path,
        *,
        values_dtype: str | None = None,
        extras_from: str | Path | None = None,
        repo_id: str | None = None,
    ) -> None:
        """The mixin's save hook: every file of the artifact, each written atomically, the card last.

        The keyword arguments are those of :meth:`save_pretrained`; the file format lives in
        ``artifact.weights`` (the codec) and ``artifact.companions`` (what travels beside it).
        """
        save_directory = Path(save_directory)
        values_dtype = values_dtype or self.values_dtype
        tensors = encode_members([member.state_dict() for member in self.members], self.masks, values_dtype)
        config_json = self.config.to_json()
        companions = companion_source(
            save_directory,
            extras_from=extras_from,
            source_dir=self.source_dir,
            tensors=tensors,
            config=json.loads(config_json),
        )
        write_weights(save_directory / WEIGHTS_NAME, tensors, values_dtype)
        write_text_atomic(save_directory / CONFIG_NAME, config_json)
        if companions is not None:
            copy_companions(companions, save_directory)
        write_endpoint_files(save_directory)
        card = self.generate_model_card(save_directory=save_directory, repo_id=repo_id)
        write_text_atomic(save_directory / README_NAME, str(card))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
    ) -> EnsembleModel:
        """The mixin's load hook: resolve ``config.json`` and ``model.safetensors``, decode strictly."""
        download = dict(
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        config_path = resolve_file(model_id, CONFIG_NAME, **download)
        config = EnsembleConfig.from_json_file(str(config_path))
        weights = resolve_file(model_id, WEIGHTS_NAME, **download)
        tensors = read_weights(weights)
        model = cls(config, independent_init=False)  # every weight is overwritten from the file right after
        templates = [member.state_dict() for member in model.members]
        decoded = decode_members(tensors, templates, source=weights, architecture=config.architecture)
        for index, (member, (state, masks)) in enumerate(zip(model.members, decoded, strict=True)):
            member.load_state_dict(state, strict=True)  # a copy into the module: cheaper than assigning
            model.masks[index] = masks
        model._check_input_channels(config_path)
        model.source_dir = config_path.parent
        model.values_dtype = stored_values_dtype(tensors)
        # `.to` walks every module: skip it when the tensors already live there (the common CPU case)
        return model if torch.device(map_location) == torch.device("cpu") else model.to(map_location)

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        values_dtype: str | None = None,
        extras_from: str | Path | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        **push_to_hub_kwargs: Any,
    ) -> CommitInfo | None:
        """Write the Hub artifact to a folder, each file atomically.

        Writes ``config.json``, ``model.safetensors``, ``handler.py`` + ``requirements.txt`` (Inference
        Endpoints) and the model card ``README.md``. The folder's companions (``onnx/``, ``assets/``,
        ``train_summary.json``, ``eval_results.json``) are copied from ``extras_from``, or else from
        :attr:`source_dir` when the ensemble is unchanged since it was loaded (they would describe
        other weights otherwise, so they are left out with a warning).

        Not the mixin's ``save_pretrained``: that one deletes ``config.json`` before its hook runs (a
        failed save would leave the folder without one) and keeps an existing ``README.md`` (a stale
        card); here the hook :meth:`_save_pretrained` writes every file, atomically.

        Args:
            save_directory: the folder (created if needed).
            values_dtype: dtype of the stored conv/linear weights (sparse values and layers the
                distribution left dense): "float32", "float16" or "bfloat16"; biases and norm tensors
                keep theirs. Default: the dtype the ensemble was loaded with (float32 for a new one).
            extras_from: folder whose companions to copy whatever changed.
            repo_id: the Hub repo named in the model card's usage snippet (and pushed to).
            push_to_hub: also push to ``repo_id`` (default: the folder's name), as ``push_to_hub`` does.
            push_to_hub_kwargs: forwarded to :meth:`push_to_hub`.

        Returns:
            The commit when pushed, else None.
        """
        self._save_pretrained(Path(save_directory), values_dtype=values_dtype, extras_from=extras_from, repo_id=repo_id)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload FreeTickets ensemble",
        create_pr: bool = False,
        token: str | None = None,
        values_dtype: str | None = None,
        extras_from: str | Path | None = None,
    ) -> CommitInfo:
        """Save to a temporary folder and upload it to ``repo_id`` as one commit (created if needed).

        Only the artifact's files travel (config, safetensors weights, card, handler, requirements,
        and the companions :meth:`save_pretrained` copies): never pickles or training checkpoints.
        Not the mixin's ``push_to_hub``: that one uploads with ``upload_folder``, which may split a
        large folder over several commits, and takes ``branch`` where this API takes ``revision``.

        Args:
            repo_id: ``org/name`` on the Hub.
            private: visibility of a newly created repo.
            revision: branch to commit to (created when missing); default ``main``.
            commit_message: the commit's summary.
            create_pr: open a pull request instead of committing to the branch.
            token: Hub token; default: the locally saved one.
            values_dtype: as in :meth:`save_pretrained`.
            extras_from: as in :meth:`save_pretrained`.
        """
        return push_staged(
            lambda folder: self._save_pretrained(
                folder, values_dtype=values_dtype, extras_from=extras_from, repo_id=repo_id
            ),
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            token=token,
        )

    def generate_model_card(self, *args: Any, save_directory: Path | None = None, **kwargs: Any) -> ModelCard:
        """The mixin's card hook: the card of ``model_cards/``, its numbers read from ``save_directory``."""
        return render_model_card(self, save_directory, repo_id=kwargs.get("repo_id"))

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

        Nothing from the repo is executed: ``handler.py`` is never imported and no pickle is read.
        ``HF_HUB_OFFLINE=1`` resolves repo ids from the local Hub cache only.

        Not the mixin's ``from_pretrained``: that one fetches ``config.json`` itself, untagged by our
        ``library_name`` and with huggingface_hub's errors (a mistyped folder becomes a repo-id
        validation error); here :func:`.artifact.hub.resolve_file` resolves every file inside the
        hook :meth:`_from_pretrained`.

        Args:
            pretrained_model_name_or_path: a folder, or a Hub repo id (``org/name``).
            revision: branch, tag or commit hash on the Hub.
            cache_dir: Hub cache folder (default: ``$HF_HOME/hub``).
            force_download: download again even if cached.
            token: Hub token for private or gated repos.
            local_files_only: use the cache only, never the network.
            map_location: device to put the ensemble on.

        Raises:
            ConfigError: ``config.json`` is malformed or has impossible values.
            ArtifactError: a tensor is missing, extra, mis-shaped or the file is corrupt.
        """
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
        )

    def _check_input_channels(self, config_path: Path) -> None:
        """``pretrained_cfg.input_size`` must give the channel count the first conv's weights take."""
        input_size = self.config.pretrained_cfg.get("input_size")
        member = self.members[0]
        first = (getattr(member, "pretrained_cfg", None) or {}).get("first_conv")
        state = member.state_dict()
        weight = state.get(f"{first}.weight") if isinstance(first, str) else None
        if weight is None:
            weight = next((t for t in state.values() if t.dim() == 4), None)
        if input_size and weight is not None and int(input_size[0]) != weight.shape[1]:
            raise ArtifactError(
                f"{config_path}: pretrained_cfg.input_size {list(input_size)} has {input_size[0]} channel(s), but the "
                f"weights take {weight.shape[1]} (model_args.in_chans {self.config.model_args.get('in_chans', 3)})"
            )
