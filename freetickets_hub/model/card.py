"""Render an ensemble's model card from ``model_cards/`` with huggingface_hub's ``ModelCard``.

Numbers in the card come from the folder itself: the stored bytes, the masks, the run's own
``train_summary.json`` (test metrics, FLOPs) and, preferred when present, the ``eval_results.json``
written by ``freetickets evaluate --output``. Nothing is typed in by hand. The metadata is built with
huggingface_hub's ``ModelCardData`` and ``EvalResult``, which validate it (``model-index`` included).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from freetickets_hub.artifact.hub import is_repo_id
from freetickets_hub.artifact.names import (
    ASSETS_DIR,
    EVAL_RESULTS_NAME,
    EXPORT_REPORT_NAME,
    LIBRARY_NAME,
    SUMMARY_NAME,
    WEIGHTS_NAME,
)

if TYPE_CHECKING:
    from freetickets_hub.model.ensemble import EnsembleModel

__all__ = ["SUMMARY_NAME", "TAGS", "member_sparsity", "public_text", "render_model_card"]

logger = logging.getLogger(__name__)

REPO_URL = "https://github.com/freetickets/freetickets-hub"
TAGS = ["ensemble", "sparse", "uncertainty-estimation", "model-calibration", "timm", "freetickets"]
# metric key in our results -> (model-index metric type, display name)
_METRICS = {
    "accuracy": ("accuracy", "Accuracy"),
    "nll": ("nll", "NLL"),
    "ece": ("ece", "ECE (15 bins)"),
    "brier": ("brier", "Brier score"),
}
_METHOD_TITLES = {
    "edst": "EDST Ensemble: one run, M tickets",
    "dst": "DST Ensemble: M independent sparse runs",
    "static_sparse": "static sparse ensemble",
    "dense_ensemble": "dense deep ensemble",
    "narrow_dense_ensemble": "narrow dense ensemble: M dense members at a fraction of the width",
    "dense": "single dense model",
    "merged": "members merged from separate runs",
}


# an absolute POSIX path inside a text, or one under `~` or an environment variable (`${FREETICKETS_DATASETS}/x`),
# but not a URL's path: the card keeps only its last part
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/$}~-])(?:~|\$\{\w+\}|\$\w+)?/(?:[^\s/'\"()\[\],:]+/)*([^\s/'\"()\[\],:]+)/?")


def public_text(text: str) -> str:
    """``text`` without the saving machine's paths: ``/home/me/data/fmnist [test]`` -> ``fmnist [test]``.

    A path under an environment variable is a machine path too: ``${FREETICKETS_DATASETS}/fashion_mnist``
    -> ``fashion_mnist``.
    """
    return _ABSOLUTE_PATH.sub(r"\1", text)


@dataclass
class _Evaluation:
    """Metrics of the ensemble (row ``ensemble``) and its members (``member_{i}``) on one split."""

    source: str  # the file they were read from
    dataset: str
    split: str
    description: str
    rows: dict[str, dict[str, float]]
    temperature: float  # the calibration temperature the numbers were measured at


def render_model_card(model: EnsembleModel, folder: Path | None, *, repo_id: str | None = None) -> ModelCard:
    """The card of ``model`` saved in ``folder`` (whose weights, summaries and assets it describes).

    Args:
        model: the ensemble.
        folder: the saved folder, or None for a card without file-derived numbers.
        repo_id: the Hub repo named in the usage snippet (default: the folder's name).
    """
    cfg = model.config
    summary = _read_json(folder, SUMMARY_NAME)
    evaluations = _read_evaluations(folder, summary, model.temperature)
    evaluation = evaluations[0] if evaluations else None
    calibration = cfg.ensemble.calibration
    title = f"{cfg.architecture} {cfg.ensemble.method.upper()} ensemble (M={model.num_members})"
    eval_results = [r for e in evaluations for r in _eval_results(e, labelled=calibration is not None)]
    datasets = sorted({d for d in (summary.get("dataset"), evaluation and evaluation.dataset) if is_repo_id(d)})
    base_model, base_is_repo = _base_model(summary)
    lineage = {"base_model_relation": summary["base_model_relation"]} if summary.get("base_model_relation") else {}
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="image-classification",
        tags=[*TAGS, cfg.ensemble.method],
        license="apache-2.0",
        datasets=datasets or None,
        base_model=base_model if base_is_repo else None,
        model_name=title if eval_results else None,
        eval_results=eval_results or None,
        **(lineage if base_is_repo else {}),
    )
    weights = folder / WEIGHTS_NAME if folder else None
    file_bytes = weights.stat().st_size if weights and weights.is_file() else 0
    sizes = _member_bytes(weights, model.num_members)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.members[0].state_dict().values())
    costs = summary.get("costs") or {}
    recipe = (summary.get("finetune") or {}).get("recipe") or _applicable_keys(summary.get("recipe"))
    template = resources.files("freetickets_hub.model_cards").joinpath("ensemble_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=title,
        repo_id=repo_id or (folder.name if folder else "<repo id>"),
        repo_url=REPO_URL,
        num_members=model.num_members,
        architecture=cfg.architecture,
        method_title=_METHOD_TITLES.get(cfg.ensemble.method, cfg.ensemble.method),
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if base_is_repo else None,
        finetune=_finetune_rows(summary),
        members=_member_rows(model, sizes, evaluation),
        sparsity=cfg.ensemble.sparsity,
        distribution=cfg.ensemble.distribution,
        weights_bytes=f"{file_bytes:,}" if file_bytes else "n/a",
        dense_bytes=f"{dense_bytes:,}",
        bytes_ratio=f"{file_bytes / dense_bytes:.2f}" if file_bytes else "n/a",
        flops_member=_format_flops(costs.get("inference_flops_member")),
        flops_ensemble=_format_flops(costs.get("inference_flops_ensemble")),
        flops_dense=_format_flops(costs.get("inference_flops_dense_member")),
        temperature=f"{model.temperature:.4f}",
        fit_on=public_text(calibration.fit_on) if calibration else "",
        calibrated=calibration is not None,
        evaluation=evaluation,
        evaluation_sources=" and ".join(sorted({f"`{e.source}`" for e in evaluations})),
        results=_result_rows(evaluations, calibrated=calibration is not None),
        uncalibrated_only=calibration is not None and bool(evaluations) and evaluation.temperature != model.temperature,
        recipe=public_text(yaml.safe_dump(recipe, sort_keys=True).strip()) if recipe else "",
        assets=sorted(p.relative_to(folder).as_posix() for p in (folder / ASSETS_DIR).glob("*.png")) if folder else [],
        selective=_selective_section(cfg.ensemble.selective, folder),
        graphs=_graph_rows(folder, file_bytes),
        ood_limits=_ood_limitations(folder),
    )


def _base_model(summary: dict[str, Any]) -> tuple[str | None, bool]:
    """The base a fine-tuned ensemble came from, as the card names it, and whether it is a Hub repo id.

    The fine-tune records which it was (``base_model_is_repo_id``), since whether a name exists as a
    folder depends on where the card is rendered. Summaries written before that say it by a Hub commit
    (``base_model_revision``), which a local base never has. A local base is named by its last part.
    """
    name = summary.get("base_model")
    if not isinstance(name, str) or not name:
        return None, False
    repo = summary.get("base_model_is_repo_id")
    if not isinstance(repo, bool):
        repo = summary.get("base_model_revision") is not None
    return (name, True) if repo else (Path(name).name or name, False)


# recipe keys that only one kind of schedule reads (training/recipe.py): the card shows those of the run's method
_EDST_KEYS = {
    "explore_epochs", "refine_epochs", "refine_lrs", "refine_lr_milestones", "escape_rate", "escape_growth",
    "prune_rate_restart",
}  # fmt: skip
_FIXED_EPOCH_KEYS = {"epochs", "lr_milestones"}  # dst, dense, (narrow_)dense_ensemble, static_sparse members
_MASK_UPDATE_KEYS = {
    "growth", "prune_rate", "prune_rate_schedule", "prune_rate_final", "update_interval", "update_end", "regrow_pruned",
}  # fmt: skip
_MASK_KEYS = {"sparsity", "distribution", "random_mask_rate"}
_WIDTH_KEYS = {"channel_sparsity", "channel_multiple"}  # narrow_dense_ensemble, and dst/edst at structure: channel
_CHANNEL_KEYS = {
    "structure",
    "channel_start",
    "channel_end",
    "channel_floor",
    "channel_criterion",
    "channel_allocation",
}
_UNUSED_KEYS = {
    "edst": _FIXED_EPOCH_KEYS | _WIDTH_KEYS,
    "dst": _EDST_KEYS | _WIDTH_KEYS,
    "static_sparse": _EDST_KEYS | _MASK_UPDATE_KEYS | _WIDTH_KEYS,
    "dense_ensemble": _EDST_KEYS | _MASK_UPDATE_KEYS | _MASK_KEYS | _WIDTH_KEYS,
    "narrow_dense_ensemble": _EDST_KEYS | _MASK_UPDATE_KEYS | _MASK_KEYS,
    "dense": _EDST_KEYS | _MASK_UPDATE_KEYS | _MASK_KEYS | _WIDTH_KEYS,
}


def _applicable_keys(recipe: Any) -> dict[str, Any] | None:
    """A training recipe without the keys its method never reads (an EDST run has no ``epochs``)."""
    if not isinstance(recipe, dict):
        return None
    unused = _UNUSED_KEYS.get(recipe.get("method"), set())
    unused = unused - _WIDTH_KEYS if recipe.get("structure") == "channel" else unused | _CHANNEL_KEYS
    return {key: value for key, value in recipe.items() if key not in unused}


def _selective_section(selective: Any, folder: Path | None) -> dict[str, Any] | None:
    """What the card says about the stored selective rule: the fitted numbers and, if evaluated, the test's."""
    if selective is None:
        return None
    rule = ((_read_json(folder, EVAL_RESULTS_NAME).get("selective") or {}).get("stored_rule")) or {}
    plot = folder is not None and (folder / ASSETS_DIR / "risk_coverage.png").is_file()
    section: dict[str, Any] = {"n": selective.n, "fit_on": public_text(selective.fit_on or ""), "plot": plot}
    if selective.score is not None:
        relation = "at least" if selective.score == "confidence" else "at most"
        section["threshold"] = {
            "rule": f"its `{selective.score}` is {relation} {selective.threshold:.6g}",
            "target_risk": f"{selective.target_risk:g}",
            "confidence": f"{1 - selective.delta:g}",
            "coverage": f"{100 * selective.calibration_coverage:.2f}",
            "risk": f"{selective.calibration_risk:.4f}",
        }
        if "threshold" in rule and _is_number(rule["threshold"].get("coverage")):
            test = rule["threshold"]
            section["threshold"]["test"] = {
                "coverage": f"{100 * test['coverage']:.2f}",
                "risk": "n/a" if not _is_number(test.get("risk")) else f"{test['risk']:.4f}",
            }
    if selective.conformal_score is not None:
        section["conformal"] = {
            "score": selective.conformal_score.upper(),
            "coverage": f"{1 - selective.conformal_alpha:g}",
            "quantile": f"{selective.conformal_quantile:.6g}",
        }
        if "conformal" in rule and _is_number(rule["conformal"].get("coverage")):
            test = rule["conformal"]
            section["conformal"]["test"] = {
                "coverage": f"{100 * test['coverage']:.2f}",
                "size": f"{test['mean_set_size']:.3f}",
            }
    return section


def _graph_rows(folder: Path | None, weights_bytes: int) -> list[dict[str, str]]:
    """One row per exported ONNX graph (``onnx/export_report.json``): file, size and measured quality."""
    report = _read_json(folder, EXPORT_REPORT_NAME)
    if not report or not (folder / report.get("graph", "")).is_file():
        return []

    def size(nbytes: int) -> str:
        ratio = f", {nbytes / weights_bytes:.2f}× model.safetensors" if weights_bytes else ""
        return f"{nbytes / 1e6:.1f} MB{ratio}"

    diff = max((report.get("max_abs_diff") or {}).get(name, 0.0) for name in report.get("gated_outputs", []))
    rows = [
        {
            "file": report["graph"],
            "precision": "fp16" if report.get("fp16") else "fp32",
            "size": size(report.get("graph_bytes", 0)),
            "quality": f"max abs difference to PyTorch {diff:.1e} (batch sizes {report.get('batch_sizes')})",
        }
    ]
    int8 = report.get("int8")
    if int8 and (folder / int8["graph"]).is_file():
        fp32, q = int8["fp32"], int8["int8"]
        quality = (
            f"top-1 agreement with fp32 {int8['agreement']:.2%}; accuracy {q['accuracy']:.2%} (fp32 "
            f"{fp32['accuracy']:.2%}), NLL {q['nll']:.4f} ({fp32['nll']:.4f}), ECE {q['ece']:.4f} ({fp32['ece']:.4f}) "
            f"on {int8['held_out_images']} held-out images of {public_text(int8['source'])}"
        )
        quality += _int8_rule_text(int8.get("selective"))
        rows.append(
            {"file": int8["graph"], "precision": "int8 (QDQ)", "size": size(int8["graph_bytes"]), "quality": quality}
        )
    return rows


def _int8_rule_text(selective: Any) -> str:
    """What the export measured of the stored selective rule (fitted on fp32 outputs) on the int8 graph."""
    if not isinstance(selective, dict):
        return ""
    said = []
    threshold = {name: (selective.get(name) or {}).get("threshold") for name in ("fp32", "int8")}
    if _is_number(selective.get("abstain_agreement")) and all(isinstance(t, dict) for t in threshold.values()):
        fp32, int8 = threshold["fp32"], threshold["int8"]
        said.append(
            f"the stored abstention rule (fitted on fp32 outputs, applied unchanged) decides as on fp32 for "
            f"{selective['abstain_agreement']:.2%} of them; it answers {int8['coverage']:.2%} with error rate "
            f"{_rate(int8.get('risk'))} (fp32: {fp32['coverage']:.2%}, {_rate(fp32.get('risk'))})"
        )
    if _is_number(selective.get("set_agreement")):
        said.append(f"its prediction sets equal fp32's for {selective['set_agreement']:.2%} of them")
    return "; " + "; ".join(said) if said else ""


def _rate(value: Any) -> str:
    return f"{value:.4f}" if _is_number(value) else "n/a"


# entropy AUROC at or above which the card says the ensemble flags an OOD set, or flags it partly
OOD_FLAGS, OOD_PARTLY = 0.9, 0.7
# OOD kind (``freetickets_hub.evaluation.ood_suite``) -> (title, what its sets are, how to measure it)
_OOD_KINDS = {
    "far": ("far-OOD", "other datasets and generated images", "`--ood-dataset sklearn:digits` or `synthetic:*`"),
    "shifted": (
        "shifted",
        "the evaluation images inverted, rotated or corrupted at severity 5",
        "`--ood-dataset shift:*`, or `suite`",
    ),
    "near": (
        "near-OOD",
        "classes the model was not trained on",
        "train with the recipe key `exclude_classes` and evaluate with `--ood-dataset held-out`",
    ),
}


def _ood_limitations(folder: Path | None) -> dict[str, Any] | None:
    """Per OOD kind, the sets ``eval_results.json`` says the ensemble flags, partly flags and does not flag."""
    results = _read_json(folder, EVAL_RESULTS_NAME)
    ood = results.get("ood")
    if not isinstance(ood, dict):
        return None
    verdicts: dict[str, dict[str, list[str]]] = {kind: {} for kind in _OOD_KINDS}
    classes: dict[str, list[str]] = {}
    for name, result in ood.items():
        auroc = ((result or {}).get("entropy") or {}).get("auroc") if isinstance(result, dict) else None
        if not _is_number(auroc):
            continue
        kind = result.get("kind", "far")  # results written before kinds existed held only dataset sources: far-OOD
        if kind not in _OOD_KINDS:
            continue
        verdict = "flags" if auroc >= OOD_FLAGS else "partly flags" if auroc >= OOD_PARTLY else "does not flag"
        verdicts[kind].setdefault(verdict, []).append(f"`{public_text(str(name))}` ({auroc:.3f})")
        if isinstance(result.get("classes"), list):
            classes[kind] = [str(c) for c in result["classes"]]
    if not any(verdicts.values()):
        return None
    kinds, missing = [], []
    for kind, (title, about, how) in _OOD_KINDS.items():
        if not verdicts[kind]:
            missing.append({"title": title, "how": how})
            continue
        if kind in classes:
            about = f"{about}: {', '.join(classes[kind])}"
        said = [
            f"{v} {', '.join(verdicts[kind][v])}"
            for v in ("flags", "partly flags", "does not flag")
            if v in verdicts[kind]
        ]
        kinds.append({"title": title, "about": about, "verdicts": "; ".join(said)})
    dataset = public_text(f"{results.get('dataset', 'the evaluation split')} [{results.get('split', 'test')}]")
    return {"dataset": dataset, "flags": OOD_FLAGS, "partly": OOD_PARTLY, "kinds": kinds, "missing": missing}


def _read_json(folder: Path | None, name: str) -> dict[str, Any]:
    if folder is None or not (folder / name).is_file():
        return {}
    data = json.loads((folder / name).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        logger.warning("Ignoring %s: expected a JSON object, got %s", folder / name, type(data).__name__)
        return {}
    return data


def _read_evaluations(folder: Path | None, summary: dict[str, Any], temperature: float) -> list[_Evaluation]:
    """The run's own evaluations, the one the card leads with first.

    ``eval_results.json`` (``freetickets evaluate``, at the temperature it records) leads when present,
    else the summary's ``test`` block, measured when training ended: before any calibration, at T = 1.
    Both are kept when they hold the same split at different temperatures, so a calibrated model shows
    its numbers before and after calibration.
    """
    found = []
    results = _read_json(folder, EVAL_RESULTS_NAME)
    if results.get("dataset") and _metric_rows(results):
        split = str(results.get("split", "test"))
        count = f", {results['num_images']} images" if _is_number(results.get("num_images")) else ""
        description = public_text(f"{results['dataset']} [{split}]{count}")
        measured_at = float(results["temperature"]) if _is_number(results.get("temperature")) else temperature
        rows = _metric_rows(results)
        found.append(_Evaluation(EVAL_RESULTS_NAME, str(results["dataset"]), split, description, rows, measured_at))
    if summary.get("dataset") and _metric_rows(summary.get("test")):
        split = str((summary.get("recipe") or {}).get("test_split", "test"))
        description = public_text(summary.get("test_split_description") or f"{summary['dataset']} [{split}]")
        test = _Evaluation(
            SUMMARY_NAME, str(summary["dataset"]), split, description, _metric_rows(summary["test"]), 1.0
        )
        other_temperature = bool(found) and _same_split(found[0], test) and found[0].temperature != 1.0
        if not found or (other_temperature and "ensemble" in test.rows):
            found.append(test)
    return found


def _same_split(a: _Evaluation, b: _Evaluation) -> bool:
    """Whether two evaluations name the same split of the same data (a local folder by its last part)."""
    return (Path(public_text(a.dataset)).name, a.split) == (Path(public_text(b.dataset)).name, b.split)


def _metric_rows(block: Any) -> dict[str, dict[str, float]]:
    """Rows ``ensemble``, ``member_0``... that carry numeric metrics, keeping only the numeric ones.

    Members come as ``member_{i}`` keys (``train_summary.json``) or as a ``members`` list of
    ``{"member": i, ...}`` (``eval_results.json``).
    """
    if not isinstance(block, dict):
        return {}
    named = {k: v for k, v in block.items() if k == "ensemble" or k.startswith("member_")}
    for entry in block.get("members") or []:
        if isinstance(entry, dict) and isinstance(entry.get("member"), int):
            named[f"member_{entry['member']}"] = entry
    rows = {}
    for name, row in named.items():
        if isinstance(row, dict):
            numbers = {k: float(v) for k, v in row.items() if k in _METRICS and _is_number(v)}
            if "accuracy" in numbers:
                rows[name] = numbers
    return rows


def _temperature_label(temperature: float) -> str:
    return "T = 1, uncalibrated" if temperature == 1.0 else f"calibrated, T = {temperature:.4f}"


def _eval_results(evaluation: _Evaluation, *, labelled: bool) -> list[EvalResult]:
    """``model-index`` entries for the ensemble's metrics (members stay in the card's body).

    For a calibrated model (``labelled``) each metric's name says the temperature it was measured at
    and its ``args`` hold it, so uncalibrated and calibrated values of one metric type stay apart.
    """
    if "ensemble" not in evaluation.rows:
        return []
    dataset = evaluation.dataset if is_repo_id(evaluation.dataset) else Path(public_text(evaluation.dataset)).name
    suffix = f" ({_temperature_label(evaluation.temperature)})" if labelled else ""
    return [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=evaluation.split,
            metric_type=_METRICS[key][0],
            metric_name=_METRICS[key][1] + suffix,
            metric_value=round(value, 6),
            metric_args={"temperature": evaluation.temperature} if labelled else None,
        )
        for key, value in evaluation.rows["ensemble"].items()
    ]


def _result_rows(evaluations: list[_Evaluation], *, calibrated: bool) -> list[dict[str, str]]:
    """Table rows: the leading evaluation's members and ensemble, then the other's ensemble (another temperature)."""
    if not evaluations:
        return []
    lead = evaluations[0]
    members = sorted((k for k in lead.rows if k.startswith("member_")), key=lambda k: int(k.split("_")[-1]))
    named = [(lead, name) for name in members]
    named += [(e, "ensemble") for e in evaluations if "ensemble" in e.rows]
    return [
        {
            "name": f"{name} ({_temperature_label(e.temperature)})" if calibrated else name,
            **{k: f"{e.rows[name][k]:.4f}" if k in e.rows[name] else "n/a" for k in _METRICS},
        }
        for e, name in named
    ]


def member_sparsity(member: Any, masks: dict[str, Any]) -> tuple[int, int]:
    """``(nonzero, total)`` over ALL of a member's conv and linear weights (the maskable ones).

    The one sparsity definition of the card, ``train_summary.json`` (``sparsity.realised``) and the
    README: ``1 - nonzero / total``. A layer the distribution left dense counts with all its weights.
    """
    from torch import nn

    maskable = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    nonzero = total = 0
    for name, module in member.named_modules():
        if isinstance(module, maskable):
            mask = masks.get(f"{name}.weight")
            total += module.weight.numel()
            nonzero += int(mask.sum()) if mask is not None else module.weight.numel()
    return nonzero, total


def _member_rows(model: EnsembleModel, sizes: list[int], evaluation: _Evaluation | None) -> list[dict[str, str]]:
    rows = []
    for index, member in enumerate(model.members):
        masks = model.masks[index]
        active, total = member_sparsity(member, masks)
        accuracy = evaluation.rows.get(f"member_{index}", {}).get("accuracy") if evaluation else None
        rows.append(
            {
                "index": str(index),
                "nonzero": f"{active:,} of {total:,}",
                "sparsity": f"{1 - active / total:.4f}" if total else "0.0000",
                "bytes": f"{sizes[index]:,}" if sizes else "n/a",
                "accuracy": f"{accuracy:.4f}" if accuracy is not None else "n/a",
            }
        )
    return rows


def _finetune_rows(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Mode and diversity before/after of a fine-tuned ensemble (``train_summary.json``), or None."""
    block = summary.get("finetune")
    if not isinstance(block, dict) or not isinstance(block.get("diversity"), dict):
        return None
    before, after = block["diversity"].get("before") or {}, block["diversity"].get("after") or {}
    names = {
        "disagreement": "disagreement",
        "pairwise_kl": "pairwise KL (nats)",
        "mutual_information": "mutual information (nats)",
        "feature_cka": "feature similarity (linear CKA)",
    }
    rows = [
        {"name": label, "before": f"{before[key]:.4f}", "after": f"{after[key]:.4f}"}
        for key, label in names.items()
        if _is_number(before.get(key)) and _is_number(after.get(key))
    ]
    recipe = block.get("recipe") if isinstance(block.get("recipe"), dict) else {}
    schedule = {key: recipe.get(key) for key in ("augment", "lr", "backbone_lr", "epochs", "warmup_epochs")}
    schedule |= {key: f"{schedule[key]:g}" for key in ("lr", "backbone_lr") if _is_number(schedule[key])}
    return {
        "mode": block.get("mode", ""),
        "base_space": before.get("label_space") == "base",
        "rows": rows,
        "schedule": schedule if all(value is not None for value in schedule.values()) else None,
        "searched": len(block["lr_search"]) if isinstance(block.get("lr_search"), list) else 0,
    }


def _member_bytes(weights: Path | None, num_members: int) -> list[int]:
    """Stored bytes of each member, from the safetensors header (8-byte length, then JSON)."""
    if weights is None or not weights.is_file():
        return []
    with weights.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    sizes = [0] * num_members
    for key, entry in header.items():
        if key.startswith("members."):
            begin, end = entry["data_offsets"]
            sizes[int(key.split(".")[1])] += end - begin
    return sizes


def _format_flops(value: Any) -> str:
    if not _is_number(value):
        return "n/a"
    exponent = min(4, max(0, int(math.log10(max(float(value), 1.0)) // 3)))
    return f"{float(value) / 10 ** (3 * exponent):,.2f} {['', 'K', 'M', 'G', 'T'][exponent]}FLOPs"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
