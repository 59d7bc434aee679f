"""Train and evaluate one benchmark run: a recipe plus overrides, trained in its own process, cached on disk.

Shared by ``quality.py`` and ``ablations.py``. Each run trains through ``python -m freetickets_hub.cli
train`` in a subprocess (accelerate's state is a per-process singleton) into its own folder, so a
benchmark is resumable per run: a finished run (``train_summary.json`` and ``model.safetensors``
present) is skipped, an interrupted one continues with ``--resume``. Evaluation uses the library's
own pieces (``run_inference``, ``fit_temperature``, ``classification_metrics``, ``detection_metrics``,
``prediction_diversity``, ``mask_distance``, ``evaluate`` for corruptions) and is cached per run.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.errors import FreeTicketsError
from freetickets_hub.evaluation import (
    CORRUPTIONS,
    EvalSplit,
    evaluate,
    load_eval_split,
    mask_distance,
    prediction_diversity,
    run_inference,
)
from freetickets_hub.evaluation.ood_suite import SHIFTS, SYNTHETIC, shifted_images, synthetic_images
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.training.data import ImageData, ImageSplit, load_image_data
from freetickets_hub.training.recipe import Recipe, load_recipe
from freetickets_hub.uncertainty.calibration import fit_temperature
from freetickets_hub.uncertainty.metrics import classification_metrics, detection_metrics
from freetickets_hub.uncertainty.outputs import combine_member_logits

__all__ = [
    "REPO",
    "EvalSettings",
    "RunSpec",
    "claimed",
    "epoch_budget",
    "evaluate_run",
    "load_shared_data",
    "train_run",
]

REPO = Path(__file__).resolve().parents[1]
CLAIM_NAME = ".claim"  # a run folder's flock lock file (it shows the last holder's pid)
SPEC_NAME = "benchmark_spec.json"  # what the folder was asked to train, and the wall time of each attempt
EVAL_NAME = "benchmark_eval.json"  # cached evaluation, keyed by the settings that produced it
OOD_SOURCE = "sklearn:digits"
SUITE_IMAGES = 500  # images per synthetic set and per shifted copy of the test split
METRIC_KEYS = ("accuracy", "nll", "ece", "brier")


@dataclass
class RunSpec:
    """One training job: a recipe file and ``--set`` overrides."""

    name: str  # folder name and results key
    label: str  # human-readable name for tables and plots
    recipe: str  # path relative to the repository root
    overrides: list[str] = field(default_factory=list)

    def load(self) -> Recipe:
        return load_recipe(REPO / self.recipe, self.overrides)


@dataclass
class EvalSettings:
    """What to measure on a trained run (everything on the recipe's test split and validation carve)."""

    ood: bool = True  # OOD detection: scikit-learn's digits (all 1,797) and the far / shifted suite (500 each)
    ood_suite_images: int = SUITE_IMAGES
    corruption_images: int = 0  # first N test images, every corruption at severities 1-5 (0: skip)
    batch_size: int = 500

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_budget(epochs: int) -> tuple[int, int]:
    """The paper's EDST split of 1.8·E epochs for M=3: ``t_ex = 0.6·E`` and ``t_re = 0.4·E`` (integers).

    Raises:
        ValueError: ``epochs`` is not a positive multiple of 5, so 0.6·E and 0.4·E are not whole epochs.
    """
    if epochs < 5 or epochs % 5:
        raise ValueError(f"epochs must be a positive multiple of 5 (so t_ex = 0.6E, t_re = 0.4E), got {epochs}")
    return epochs * 3 // 5, epochs * 2 // 5


@contextmanager
def claimed(folder: Path) -> Iterator[int | None]:
    """Hold ``folder`` while the block runs: yields the lock's file descriptor, or None if another process holds it.

    Workers started side by side share a grid this way. The lock is ``flock`` on ``folder/.claim`` (which
    also shows the holder's pid): the kernel drops it once every process holding the descriptor is gone,
    so a training subprocess given it (``train_run(hold=...)``) keeps the run claimed even if its worker is
    killed, and a crash or reboot leaves no stale claim behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / CLAIM_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield fd
    finally:
        os.close(fd)


def train_run(spec: RunSpec, folder: Path, *, log: Any = print, hold: int | None = None) -> dict[str, Any]:
    """Train ``spec`` into ``folder`` in a subprocess, unless it is already there; return its summary.

    The summary gains ``benchmark_wall_time_s``: the seconds of every training process this folder saw.
    ``hold`` is a file descriptor the subprocess inherits (the folder's :func:`claimed` lock).

    Raises:
        FreeTicketsError: ``folder`` holds a run of a different recipe, or training failed.
    """
    recipe = spec.load().to_dict()
    spec_path, summary_path = folder / SPEC_NAME, folder / "train_summary.json"
    stored = json.loads(spec_path.read_text()) if spec_path.exists() else None
    done = summary_path.exists() and (folder / "model.safetensors").exists()
    found = json.loads(summary_path.read_text())["recipe"] if done else (stored or {}).get("recipe")
    if found is not None and _canonical(found) != _canonical(recipe):
        raise FreeTicketsError(
            f"{folder} holds a run of another recipe (e.g. from another preset); choose another --output-dir "
            "or delete it"
        )
    if done:
        log(f"skip {spec.name}: already trained in {folder}")
        return _summary(folder, stored)
    stored = stored or {"name": spec.name, "recipe": recipe, "overrides": spec.overrides, "attempts_s": []}
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(spec_path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    command = [sys.executable, "-m", "freetickets_hub.cli", "train", "--recipe", str(REPO / spec.recipe)]
    command += ["--output-dir", str(folder)]
    for item in spec.overrides:
        command += ["--set", item]
    resume = (folder / "checkpoints").is_dir()
    if resume:
        command.append("--resume")
    log(f"train {spec.name}{' (resuming)' if resume else ''}: log in {folder / 'train.log'}")
    start = time.perf_counter()
    try:
        with open(folder / "train.log", "a", encoding="utf-8") as out:
            inherit = () if hold is None else (hold,)
            result = subprocess.run(
                command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False, pass_fds=inherit
            )
    finally:
        stored["attempts_s"].append(round(time.perf_counter() - start, 2))
        write_text_atomic(spec_path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    if result.returncode != 0:
        tail = (folder / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise FreeTicketsError(f"training {spec.name} failed (exit {result.returncode}):\n" + "\n".join(tail))
    return _summary(folder, stored)


def _summary(folder: Path, stored: dict[str, Any] | None) -> dict[str, Any]:
    summary = json.loads((folder / "train_summary.json").read_text())
    # trained outside this benchmark: only the trainer's own clock is known
    attempts = stored["attempts_s"] if stored else [summary["wall_time_s"]]
    summary["benchmark_wall_time_s"] = round(sum(attempts), 2)
    return summary


def _canonical(recipe: dict[str, Any]) -> str:
    """The recipe with every key a later version added at its default: such a run is still the same run."""
    defaults = Recipe().to_dict()
    return json.dumps({k: v for k, v in recipe.items() if k not in defaults or v != defaults[k]}, sort_keys=True)


def load_shared_data(specs: list[RunSpec]) -> ImageData:
    """The validation carve and test split every spec trains and is tested with (they must agree).

    ``load_image_data`` carves the validation split with ``torch.randperm`` seeded by the recipe's
    seed, so loading it with the same recipe reproduces the trainer's carve exactly.
    """
    keys = ("dataset", "dataset_config", "train_split", "test_split", "seed", "val_size", "max_test_samples")
    recipes = [spec.load() for spec in specs]
    first = recipes[0]
    for spec, recipe in zip(specs, recipes, strict=True):
        differs = [k for k in keys if getattr(recipe, k) != getattr(first, k)]
        if differs:
            raise FreeTicketsError(f"run {spec.name} differs from {specs[0].name} in {differs}: not comparable")
    if not first.val_size:
        raise FreeTicketsError("the benchmark needs a validation carve (val_size > 0) to fit temperatures on")
    return load_image_data(first)


def evaluate_run(
    folder: Path, data: ImageData, settings: EvalSettings, accelerator: Any, *, log: Any = print
) -> dict[str, Any]:
    """Test metrics before and after temperature scaling, OOD, corruptions and diversity of one run.

    The temperature is fitted on the validation carve: one for the ensemble, and one per member for
    the members' own calibrated numbers. Results are cached in ``folder/benchmark_eval.json``.
    """
    cache = folder / EVAL_NAME
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached["settings"] == settings.to_dict() and cached["model_mtime_ns"] == stamp:
            log(f"skip evaluating {folder.name}: cached in {cache}")
            return cached["results"]
    log(f"evaluate {folder.name}")
    model = EnsembleModel.from_pretrained(folder)
    assert isinstance(data.val, ImageSplit) and isinstance(data.test, ImageSplit)  # in-memory Fashion-MNIST
    test = EvalSplit("fashion_mnist", "test", data.test.images, data.test.labels)

    def infer(images: torch.Tensor, desc: str) -> torch.Tensor:  # (M, N, K) raw logits
        return run_inference(model, images, accelerator, batch_size=settings.batch_size, desc=desc).member_logits

    val_logits, test_logits = infer(data.val.images, "validation"), infer(test.images, "test")
    fit = fit_temperature(val_logits, data.val.labels)
    member_fits = [fit_temperature(val_logits[i : i + 1], data.val.labels) for i in range(model.num_members)]
    results: dict[str, Any] = {
        "num_members": model.num_members,
        "temperature": fit.temperature,
        "temperature_fit": fit.to_dict(),
        "member_temperatures": [f.temperature for f in member_fits],
        "test": {
            "uncalibrated": _metrics(test_logits, data.test.labels, 1.0),
            "calibrated": _metrics(test_logits, data.test.labels, fit.temperature),
        },
    }
    members = {
        "uncalibrated": [_metrics(test_logits[i : i + 1], data.test.labels, 1.0) for i in range(model.num_members)],
        "calibrated": [
            _metrics(test_logits[i : i + 1], data.test.labels, f.temperature) for i, f in enumerate(member_fits)
        ],
    }
    results["members"] = members
    results["mean_member"] = {k: _mean(rows) for k, rows in members.items()}
    single = model.num_members == 1
    diversity = prediction_diversity(test_logits, fit.temperature)
    masks = mask_distance(model.masks)
    results["diversity"] = {
        "disagreement": None if single else diversity["disagreement"]["mean"],
        "kl": None if single else diversity["kl"]["mean"],
        "mask_jaccard": None if single or masks is None else masks["overall"]["jaccard"]["mean"],
    }
    if settings.ood:
        results["ood"] = _ood(
            model, test, test_logits, fit.temperature, accelerator, settings.batch_size, settings.ood_suite_images
        )
    if settings.corruption_images:
        count = min(settings.corruption_images, len(test))
        subset = EvalSplit("fashion_mnist", f"test[:{count}]", test.images[:count], test.labels[:count])
        model.set_temperature(fit.temperature, fit_on="validation carve")
        suite = evaluate(
            model, subset, corruptions=list(CORRUPTIONS), accelerator=accelerator, batch_size=settings.batch_size
        )
        results["corruptions"] = {
            "num_images": count,
            "names": sorted(CORRUPTIONS),
            "severities": suite["corruptions"]["severities"],
            **suite["corruptions"]["mean"],
        }
    write_text_atomic(
        cache,
        json.dumps({"settings": settings.to_dict(), "model_mtime_ns": stamp, "results": results}, indent=2) + "\n",
    )
    return results


def _metrics(member_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    return classification_metrics(combine_member_logits(member_logits, temperature).probs, labels)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(row[k] for row in rows) / len(rows) for k in METRIC_KEYS}


def _ood(
    model: EnsembleModel,
    test: EvalSplit,
    test_logits: torch.Tensor,
    temperature: float,
    accelerator: Any,
    batch_size: int,
    suite_images: int,
) -> dict[str, Any]:
    """Telling Fashion-MNIST test images (positive) from digits and from the far / shifted OOD suite.

    The digits keep their own keys (``msp``, ``entropy``, ``mutual_information``: detection metrics);
    ``suite`` scores every synthetic set and shifted copy of the first ``suite_images`` test images,
    and ``kinds`` averages each score's AUROC over the sets of a kind (digits count as far).
    """
    digits = load_eval_split(OOD_SOURCE, model.config, require_labels=False)
    inside = combine_member_logits(test_logits, temperature)

    def detect(images: torch.Tensor, desc: str) -> dict[str, Any]:
        logits = run_inference(model, images, accelerator, batch_size=batch_size, desc=desc).member_logits
        outside = combine_member_logits(logits, temperature)
        scores = {
            "msp": (inside.probs.max(-1).values, outside.probs.max(-1).values),
            "entropy": (-inside.entropy, -outside.entropy),
            "mutual_information": (-inside.mutual_information, -outside.mutual_information),
        }
        # one member has no mutual information: the score is constant and says nothing
        single = model.num_members == 1
        return {k: None if k == "mutual_information" and single else detection_metrics(*v) for k, v in scores.items()}

    out: dict[str, Any] = {"source": OOD_SOURCE, "num_images": len(digits), **detect(digits.images, "OOD digits")}
    shape = tuple(test.images.shape[1:])
    count = min(suite_images, len(test))
    sets = {f"synthetic:{n}": ("far", synthetic_images(n, count, shape, seed=1)) for n in SYNTHETIC}
    sets |= {f"shift:{n}": ("shifted", shifted_images(n, test.images[:count], seed=1)) for n in SHIFTS}
    out["suite"] = {name: {"kind": kind, **detect(images, name)} for name, (kind, images) in sets.items()}
    rows = [("far", out), *((e["kind"], e) for e in out["suite"].values())]
    out["kinds"] = {
        kind: {
            score: float(sum(e[score]["auroc"] for k, e in rows if k == kind) / sum(k == kind for k, _ in rows))
            for score in ("msp", "entropy", "mutual_information")
            if out[score] is not None
        }
        for kind in ("shifted", "far")
    }
    return out
