"""The ``config.json`` of a saved ensemble: timm's vocabulary plus one ``ensemble`` block of ours.

Keys outside what we know are tolerated with a warning (a newer writer may add some); known keys
are checked strictly, so a wrong type or an impossible value fails at load time with its name.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["FORMAT_VERSION", "CalibrationConfig", "EnsembleConfig", "EnsembleInfo"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METHODS = ("edst", "dst", "dense", "dense_ensemble", "static_sparse", "merged")
DISTRIBUTIONS = ("erk", "uniform", "dense")


@dataclass
class CalibrationConfig:
    """A fitted temperature and what it was fitted on."""

    method: str = "temperature"
    temperature: float = 1.0
    fit_on: str = ""  # e.g. "fashion_mnist:validation (5000 images)"

    def __post_init__(self) -> None:
        if self.method != "temperature":
            raise ConfigError(f"calibration.method must be 'temperature', got {self.method!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ConfigError(f"calibration.temperature must be a number, got {self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"calibration.temperature must be positive and finite, got {self.temperature}")


@dataclass
class EnsembleInfo:
    """Our namespaced block: how the members were made and how to combine them."""

    method: str = "edst"
    num_members: int = 1
    sparsity: float = 0.0  # target sparsity over maskable (conv/linear) weights
    distribution: str = "erk"
    calibration: CalibrationConfig | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**_known(self.calibration, CalibrationConfig, "calibration"))
        _check_type("ensemble.method", self.method, str)
        if self.method not in METHODS:
            raise ConfigError(f"ensemble.method must be one of {METHODS}, got {self.method!r}")
        _check_type("ensemble.num_members", self.num_members, int)
        if self.num_members < 1:
            raise ConfigError(f"ensemble.num_members must be at least 1, got {self.num_members}")
        _check_type("ensemble.sparsity", self.sparsity, (int, float))
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"ensemble.sparsity must be in [0, 1), got {self.sparsity}")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"ensemble.distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        _check_type("ensemble.format_version", self.format_version, int)
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(
                f"ensemble.format_version {self.format_version} is not supported by this version of "
                f"freetickets-hub (it reads format_version {FORMAT_VERSION}); upgrade freetickets-hub."
            )

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.calibration else 1.0


@dataclass
class EnsembleConfig:
    """Everything needed to rebuild an ensemble's members and preprocess its inputs."""

    architecture: str
    num_classes: int
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. in_chans
    label_names: list[str] | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)  # timm data config: input_size, mean, std...
    ensemble: EnsembleInfo = field(default_factory=EnsembleInfo)

    def __post_init__(self) -> None:
        if isinstance(self.ensemble, dict):
            self.ensemble = EnsembleInfo(**_known(self.ensemble, EnsembleInfo, "ensemble"))
        _check_type("architecture", self.architecture, str)
        _check_type("num_classes", self.num_classes, int)
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {self.num_classes}")
        _check_type("model_args", self.model_args, dict)
        _check_type("pretrained_cfg", self.pretrained_cfg, dict)
        input_size = self.pretrained_cfg.get("input_size")
        if input_size is not None and (
            not isinstance(input_size, (list, tuple))
            or len(input_size) != 3
            or not all(isinstance(v, int) and v > 0 for v in input_size)
        ):
            raise ConfigError(f"pretrained_cfg.input_size must be [channels, height, width], got {input_size!r}")
        if self.label_names is not None:
            _check_type("label_names", self.label_names, list)
            if not all(isinstance(name, str) for name in self.label_names):
                raise ConfigError(f"label_names must all be strings, got {self.label_names!r}")
            if len(self.label_names) != self.num_classes:
                raise ConfigError(
                    f"label_names has {len(self.label_names)} entries but num_classes is {self.num_classes}"
                )

    @property
    def in_chans(self) -> int:
        return int(self.model_args.get("in_chans", self.pretrained_cfg.get("input_size", (3,))[0]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        for key in ("architecture", "num_classes", "ensemble"):
            if key not in data:
                raise ConfigError(f"config is missing the required key {key!r}")
        try:
            return cls(**_known(data, cls, "config"))
        except TypeError as err:  # e.g. a nested block that is not an object
            raise ConfigError(f"config has a malformed entry: {err}") from err

    @classmethod
    def from_json_file(cls, path: str) -> EnsembleConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)


def _known(data: dict[str, Any], datacls: type, where: str) -> dict[str, Any]:
    """Keep the keys ``datacls`` knows, warning about the others (forward compatibility)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = datacls.__dataclass_fields__.keys()
    unknown = sorted(set(data) - set(names))
    if unknown:
        logger.warning("Ignoring unknown %s keys %s (written by a newer freetickets-hub?)", where, unknown)
    return {k: v for k, v in data.items() if k in names}


def _check_type(name: str, value: Any, expected: type | tuple[type, ...]) -> None:
    if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise ConfigError(f"{name} must be of type {names}, got {value!r}")
