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

from freetickets_hub.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "READ_FORMAT_VERSIONS",
    "CalibrationConfig",
    "EnsembleConfig",
    "EnsembleInfo",
    "SelectiveConfig",
]

logger = logging.getLogger(__name__)

READ_FORMAT_VERSIONS = (1, 2)  # 2 adds ensemble.member_widths (slim members, issue 23)
FORMAT_VERSION = READ_FORMAT_VERSIONS[-1]  # the newest; an artifact without slim members is still written as 1
METHODS = ("edst", "dst", "dense", "dense_ensemble", "narrow_dense_ensemble", "static_sparse", "merged")
DISTRIBUTIONS = ("erk", "uniform", "dense")
SELECTIVE_SCORES = ("confidence", "entropy", "mutual_information")
CONFORMAL_SCORES = ("lac", "aps")


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
class SelectiveConfig:
    """When to abstain and which labels to offer, fitted on held-out data after the temperature.

    Two optional parts, each complete or absent: an abstention threshold on ``score`` (answer when
    ``confidence >= threshold``, or ``entropy`` / ``mutual_information <= threshold``) whose selective
    risk is at most ``target_risk`` with probability at least ``1 - delta``; and split-conformal
    prediction sets (``conformal_score`` at ``conformal_quantile``) covering the true label with
    probability at least ``1 - conformal_alpha``. Unknown keys are an error here, unlike elsewhere in
    the config: a decision rule whose meaning is partly unknown must not be applied.
    """

    n: int  # held-out images both parts were fitted on
    fit_on: str = ""  # e.g. "fashion_mnist:validation (2500 of 5000 images; the other half fitted the temperature)"
    score: str | None = None  # confidence | entropy | mutual_information
    threshold: float | None = None
    target_risk: float | None = None  # R: bound on the error rate of the answered images
    delta: float | None = None  # the bound holds with probability >= 1 - delta over the calibration draw
    calibration_coverage: float | None = None  # share of the held-out images answered
    calibration_risk: float | None = None  # error rate of those
    conformal_alpha: float | None = None
    conformal_score: str | None = None  # lac | aps
    conformal_quantile: float | None = None

    def __post_init__(self) -> None:
        _check_type("ensemble.selective.n", self.n, int)
        if self.n < 1:
            raise ConfigError(f"ensemble.selective.n must be at least 1, got {self.n}")
        _check_type("ensemble.selective.fit_on", self.fit_on, str)
        threshold_part = ("score", "threshold", "target_risk", "delta", "calibration_coverage", "calibration_risk")
        conformal_part = ("conformal_alpha", "conformal_score", "conformal_quantile")
        for part in (threshold_part, conformal_part):
            given = [name for name in part if getattr(self, name) is not None]
            if given and len(given) != len(part):
                missing = [f"ensemble.selective.{name}" for name in part if name not in given]
                raise ConfigError(f"ensemble.selective has {given} but lacks {missing}: store all of them or none")
        if self.score is None and self.conformal_score is None:
            raise ConfigError("ensemble.selective holds neither a threshold (score...) nor conformal sets")
        if self.score is not None:
            if self.score not in SELECTIVE_SCORES:
                raise ConfigError(f"ensemble.selective.score must be one of {SELECTIVE_SCORES}, got {self.score!r}")
            _check_number("ensemble.selective.threshold", self.threshold, 0.0, math.inf)
            _check_number("ensemble.selective.target_risk", self.target_risk, 0.0, 1.0, open_low=True, open_high=True)
            _check_number("ensemble.selective.delta", self.delta, 0.0, 1.0, open_low=True, open_high=True)
            _check_number("ensemble.selective.calibration_coverage", self.calibration_coverage, 0.0, 1.0)
            _check_number("ensemble.selective.calibration_risk", self.calibration_risk, 0.0, 1.0)
            if self.score == "confidence" and self.threshold > 1.0:
                raise ConfigError(f"ensemble.selective.threshold on confidence must be in [0, 1], got {self.threshold}")
        if self.conformal_score is not None:
            if self.conformal_score not in CONFORMAL_SCORES:
                raise ConfigError(
                    f"ensemble.selective.conformal_score must be one of {CONFORMAL_SCORES}, "
                    f"got {self.conformal_score!r}"
                )
            _check_number(
                "ensemble.selective.conformal_alpha", self.conformal_alpha, 0.0, 1.0, open_low=True, open_high=True
            )
            _check_number("ensemble.selective.conformal_quantile", self.conformal_quantile, 0.0, 1.0)


@dataclass
class EnsembleInfo:
    """Our namespaced block: how the members were made and how to combine them."""

    method: str = "edst"
    num_members: int = 1
    sparsity: float = 0.0  # target sparsity over maskable (conv/linear) weights
    distribution: str = "erk"
    calibration: CalibrationConfig | None = None
    format_version: int | None = None  # None: the lowest that holds this block (1, or 2 with member_widths)
    selective: SelectiveConfig | None = None  # abstention threshold / conformal sets on the calibrated outputs
    # slim members (channel-level sparsity): per member, its widths record (freetickets_hub.model.widths:
    # module name -> [out, in] or [features]) or None for a member at the architecture's full width
    member_widths: list[dict[str, list[int]] | None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**_known(self.calibration, CalibrationConfig, "calibration"))
        if isinstance(self.selective, dict):
            self.selective = _strict_selective(self.selective)
        if self.selective is not None and not isinstance(self.selective, SelectiveConfig):
            raise ConfigError(f"ensemble.selective must be a JSON object, got {self.selective!r}")
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
        _check_member_widths(self.member_widths, self.num_members)
        if self.member_widths is not None and not any(self.member_widths):
            self.member_widths = None  # every member at full width: nothing to record
        if self.format_version is None:
            self.format_version = 1 if self.member_widths is None else 2
        _check_type("ensemble.format_version", self.format_version, int)
        if self.format_version not in READ_FORMAT_VERSIONS:
            raise ConfigError(
                f"ensemble.format_version {self.format_version} is not supported by this version of "
                f"freetickets-hub (it reads format_version {', '.join(map(str, READ_FORMAT_VERSIONS))}); "
                "upgrade freetickets-hub."
            )
        if self.member_widths is not None and self.format_version < 2:
            raise ConfigError(f"ensemble.member_widths needs format_version 2, got {self.format_version}")

    def widths_of(self, index: int) -> dict[str, list[int]] | None:
        """Member ``index``'s widths record, or None when it has the architecture's full width."""
        return None if self.member_widths is None else self.member_widths[index]

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
        data = asdict(self)
        if data["ensemble"]["member_widths"] is None:  # a format-1 config stays exactly as format 1 wrote it
            del data["ensemble"]["member_widths"]
        return data

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


def _check_member_widths(member_widths: Any, num_members: int) -> None:
    """The form of ``ensemble.member_widths``; whether the widths fit the architecture is checked at build."""
    if member_widths is None:
        return
    _check_type("ensemble.member_widths", member_widths, list)
    if len(member_widths) != num_members:
        raise ConfigError(f"ensemble.member_widths has {len(member_widths)} entries but num_members is {num_members}")
    for index, widths in enumerate(member_widths):
        if widths is None:
            continue
        where = f"ensemble.member_widths[{index}]"
        _check_type(where, widths, dict)
        for name, counts in widths.items():
            if not (
                isinstance(counts, list)
                and counts
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)
            ):
                raise ConfigError(f"{where}[{name!r}] must be a list of positive integers, got {counts!r}")


def _check_type(name: str, value: Any, expected: type | tuple[type, ...]) -> None:
    if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise ConfigError(f"{name} must be of type {names}, got {value!r}")


def _strict_selective(data: dict[str, Any]) -> SelectiveConfig:
    unknown = sorted(set(data) - set(SelectiveConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"ensemble.selective has unknown keys {unknown} (this freetickets-hub cannot apply them)")
    if "n" not in data:
        raise ConfigError("ensemble.selective is missing the required key 'n'")
    return SelectiveConfig(**data)


def _check_number(
    name: str, value: Any, low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> None:
    _check_type(name, value, (int, float))
    inside = (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
    if not (math.isfinite(value) and inside):
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"{name} must be a finite number in {bounds}, got {value}")
