"""Render an ensemble's model card from ``model_cards/`` with huggingface_hub's ``ModelCard``.

Numbers in the card come from the folder itself: the stored bytes, the masks, and the run's own
``train_summary.json`` when present. Nothing is typed in by hand.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .hub import LIBRARY_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    from .ensemble import EnsembleModel

__all__ = ["SUMMARY_NAME", "render_model_card"]

SUMMARY_NAME = "train_summary.json"
REPO_URL = "https://github.com/freetickets/freetickets-hub"
_METHOD_TITLES = {
    "edst": "EDST Ensemble: one run, M tickets",
    "dst": "DST Ensemble: M independent sparse runs",
    "static_sparse": "static sparse ensemble",
    "dense_ensemble": "dense deep ensemble",
    "dense": "single dense model",
    "merged": "members merged from separate runs",
}


def render_model_card(model: EnsembleModel, folder: Path | None) -> ModelCard:
    cfg = model.config
    summary = _read_summary(folder)
    eval_results = summary.get("test", {})
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="image-classification",
        tags=["ensemble", "sparse", "uncertainty-estimation", "model-calibration", "timm", "freetickets", cfg.ensemble.method],
        license="apache-2.0",
        datasets=[summary["dataset"]] if _is_hub_id(summary.get("dataset")) else None,
    )
    members = []
    for index, member in enumerate(model.members):
        masks = model.masks[index]
        weights = {n: p for n, p in member.state_dict().items() if n in masks}
        total = sum(w.numel() for w in weights.values())
        active = sum(int(m.sum()) for m in masks.values())
        members.append({"index": index, "nonzero": f"{active:,}" if masks else "dense", "density": f"{active / total:.3f}" if total else "1.000"})
    results = [
        {"name": name, **{k: f"{row[k]:.4f}" for k in ("accuracy", "nll", "ece")}}
        for name, row in eval_results.items()
        if isinstance(row, dict) and {"accuracy", "nll", "ece"} <= row.keys()
    ]
    weights_path = folder / WEIGHTS_NAME if folder else None
    calibration = cfg.ensemble.calibration
    template = resources.files("freetickets_hub.model_cards").joinpath("ensemble_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=f"{cfg.architecture} {cfg.ensemble.method.upper()} ensemble (M={model.num_members})",
        repo_id=folder.name if folder else "<repo id>",
        repo_url=REPO_URL,
        num_members=model.num_members,
        architecture=cfg.architecture,
        method_title=_METHOD_TITLES.get(cfg.ensemble.method, cfg.ensemble.method),
        members=members,
        sparsity=cfg.ensemble.sparsity,
        distribution=cfg.ensemble.distribution,
        weights_bytes=f"{weights_path.stat().st_size:,}" if weights_path and weights_path.exists() else "n/a",
        temperature=f"{model.temperature:.4f}",
        fit_on=calibration.fit_on if calibration else "",
        results=results,
        results_split=summary.get("test_split_description", "the test split"),
        recipe=yaml.safe_dump(summary["recipe"], sort_keys=True).strip() if summary.get("recipe") else "",
    )


def _is_hub_id(dataset: str | None) -> bool:
    """A dataset named by Hub id (not a local folder) belongs in the card's metadata."""
    return bool(dataset) and not os.path.exists(dataset) and not dataset.startswith((".", "/"))


def _read_summary(folder: Path | None) -> dict[str, Any]:
    if folder is None or not (folder / SUMMARY_NAME).is_file():
        return {}
    return json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
