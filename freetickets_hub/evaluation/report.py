"""Evaluation results as a printed table and as JSON files written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from freetickets_hub.artifact.files import write_text_atomic

__all__ = ["format_results", "write_results"]


def write_results(results: dict[str, Any], path: str | Path) -> None:
    """Write ``results`` as sorted, indented JSON; a reader never sees half a file."""
    write_text_atomic(path, json.dumps(results, sort_keys=True, indent=2) + "\n")


def format_results(results: dict[str, Any]) -> str:
    """Fixed-width tables of everything :func:`~freetickets_hub.evaluation.evaluate` measured."""
    lines = [
        f"{results['dataset']} [{results['split']}], {results['num_images']} images; "
        f"temperature {results['temperature']:.4f}; ECE over {results['ece_bins']} equal-width bins",
        f"{'model':<10} {'accuracy':>9} {'NLL':>8} {'Brier':>8} {'ECE':>8}",
    ]
    rows = [(f"member {m['member']}", m) for m in results["members"]] + [("ensemble", results["ensemble"])]
    lines += [
        f"{name:<10} {m['accuracy']:>9.4f} {m['nll']:>8.4f} {m['brier']:>8.4f} {m['ece']:>8.4f}" for name, m in rows
    ]
    selective = results["selective"]
    lines.append(
        f"selective prediction (max probability): AURC {selective['aurc']:.4f} (oracle {selective['aurc_optimal']:.4f})"
    )
    lines += _selective_lines(selective)
    if results.get("ood"):
        lines += ["", *_ood_lines(results["ood"], results["ood_summary"])]
    if results.get("corruptions"):
        corruptions = results["corruptions"]
        lines += ["", f"corruptions (ensemble, mean over severities 1-5)  {'accuracy':>9} {'NLL':>8} {'ECE':>8}"]
        named = [*corruptions["per_corruption"].items(), ("mean of all", corruptions)]
        lines += [
            f"{name:<49} {c['mean']['accuracy']:>9.4f} {c['mean']['nll']:>8.4f} {c['mean']['ece']:>8.4f}"
            for name, c in named
        ]
    diversity = results["diversity"]
    lines += [
        "",
        f"diversity: pairwise disagreement {diversity['disagreement']['mean']:.4f}, "
        f"pairwise KL {diversity['kl']['mean']:.4f} nats",
    ]
    masks = diversity.get("mask_distance")
    if masks:
        overall = masks["overall"]
        lines.append(
            f"mask distance over {len(masks['layers'])} sparse layers: Jaccard {overall['jaccard']['mean']:.4f}, "
            f"Hamming {overall['hamming']['mean']:.4f}"
        )
    runtime = results["runtime"]
    lines.append(
        f"ran on {runtime['num_processes']} process(es) ({runtime['device']}), images per process "
        f"{runtime['images_per_process']}, {runtime['seconds']:.1f} s"
    )
    return "\n".join(lines)


def _selective_lines(selective: dict[str, Any]) -> list[str]:
    """Risk at fixed coverage, and how the model's stored selective rule did on this split."""
    at = selective.get("risk_at_coverage") or {}
    lines = [f"  risk at {100 * float(c):.0f}% coverage: {r:.4f}" for c, r in at.items()]
    rule = selective.get("stored_rule") or {}
    if "threshold" in rule:
        t = rule["threshold"]
        relation = ">=" if t["score"] == "confidence" else "<="
        risk = "n/a (nothing answered)" if t["risk"] is None else f"{t['risk']:.4f}"
        verdict = "within" if t["risk_within_target"] else "ABOVE"
        lines.append(
            f"  stored abstention rule ({t['score']} {relation} {t['threshold']:.6g}): coverage {t['coverage']:.4f}, "
            f"selective risk {risk}, {verdict} the target {t['target_risk']} (guaranteed with probability "
            f">= {1 - t['delta']:g} for data like the calibration split)"
        )
    if "conformal" in rule:
        c = rule["conformal"]
        lines.append(
            f"  stored conformal sets ({c['score']}, alpha {c['alpha']:g}): coverage {c['coverage']:.4f} "
            f"(target >= {1 - c['alpha']:g}), mean set size {c['mean_set_size']:.3f}, {c['empty_sets']} empty"
        )
    return lines


_OOD_SCORES = ("msp", "entropy", "mutual_information")


def _ood_lines(ood: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """One line per OOD set: its kind and the AUROC of each score, calibrated and at T = 1; then the means per kind."""
    header = f"{'MSP':>7} {'entropy':>7} {'MI':>7}"
    lines = [
        "OOD detection AUROC (in-distribution = positive; AUPR and FPR@95%TPR in the JSON)",
        f"{'set':<44} {'kind':<8} {header}   T=1: {header}",
    ]

    def row(label: str, kind: str, calibrated: dict[str, float], uncalibrated: dict[str, float]) -> str:
        after = " ".join(f"{calibrated[s]:>7.4f}" for s in _OOD_SCORES)
        before = " ".join(f"{uncalibrated[s]:>7.4f}" for s in _OOD_SCORES)
        return f"{label:<44} {kind:<8} {after}        {before}"

    for name, result in ood.items():
        raw = result["at_temperature_1"]
        lines.append(
            row(
                f"{name} ({result['num_images']} images)",
                result["kind"],
                {s: result[s]["auroc"] for s in _OOD_SCORES},
                {s: raw[s]["auroc"] for s in _OOD_SCORES},
            )
        )
    for kind, mean in summary.items():
        label = f"mean of {len(mean['sets'])} set(s)"
        lines.append(row(label, kind, mean["auroc"], mean["auroc_at_temperature_1"]))
    return lines
