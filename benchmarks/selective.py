"""Selective prediction on Fashion-MNIST: coverage at a guaranteed risk, per model and uncertainty score.

For the single dense model, the dense ensemble and the EDST ensemble of a ``quality.py`` preset
(trained into the same folders ``quality.py`` uses, or reused from there), this measures:

- **as ``freetickets calibrate`` does it**: the run's validation carve split in two seeded halves,
  the temperature fitted on one and the abstention threshold (``--target-risk R``, ``--delta``) on
  the other, then the coverage and realised risk on the whole test split (10,000 images);
- **over repeated larger calibration draws**: the temperature on the whole validation carve, the
  threshold on a random half of the test split and its coverage and risk on the other half,
  ``--splits`` times: the mean coverage per score answers "which uncertainty score answers the most
  images at a fixed risk", and the share of draws whose realised risk exceeds R shows the guarantee
  (it is ``<= delta`` for the population risk; the realised risk of 5,000 images adds its own noise);
- split-conformal LAC and APS sets at ``alpha`` on the same draws: coverage and mean set size.

    python benchmarks/selective.py --preset smoke   # trains the three runs if missing (~5 min idle)
    python benchmarks/selective.py --preset full    # reuses quality.py's full runs (or trains them: ~75 min idle)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning thread pools distort a shared CPU

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quality import PRESETS, SMOKE_NOTE, build_specs
from quality_report import markdown_table, provenance, write_results
from quality_runs import REPO, load_shared_data, train_run

from freetickets_hub.evaluation import create_accelerator, load_eval_split, run_inference
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.calibration import fit_temperature
from freetickets_hub.uncertainty.outputs import combine_member_logits
from freetickets_hub.uncertainty.selective import (
    SELECTIVE_SCORES,
    InfeasibleRiskError,
    fit_conformal,
    fit_threshold,
    prediction_sets,
)

MODELS = ("single_dense", "dense_ensemble", "edst_ensemble")
RISKS = (0.01, 0.02, 0.05, 0.10)  # the three, and 0.10 where weak (smoke) models first answer anything
DELTA = 0.1
ALPHA = 0.1
CACHE_NAME = "benchmark_selective_logits.npz"  # raw member logits on the validation carve and the test split


def member_logits(folder: Path, val_images: torch.Tensor, test_images: torch.Tensor, accelerator: Any) -> dict:
    """Raw ``(M, N, K)`` logits on the validation carve and the test split, cached beside the weights."""
    cache = folder / CACHE_NAME
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    if cache.exists():
        with np.load(cache) as stored:
            if int(stored["model_mtime_ns"]) == stamp and stored["test"].shape[1] == len(test_images):
                return {"val": torch.from_numpy(stored["val"]), "test": torch.from_numpy(stored["test"])}
    model = EnsembleModel.from_pretrained(folder)
    logits = {
        name: run_inference(model, images, accelerator, batch_size=500, desc=f"{folder.name} {name}").member_logits
        for name, images in (("val", val_images), ("test", test_images))
    }
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, val=logits["val"].numpy(), test=logits["test"].numpy(), model_mtime_ns=np.int64(stamp))
    tmp.replace(cache)
    return logits


def outputs_of(logits: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    out = combine_member_logits(logits, temperature)
    return {key: getattr(out, key).double().numpy() for key in ("probs", "entropy", "mutual_information")}


def realised(outputs: dict[str, np.ndarray], labels: np.ndarray, fit: Any) -> tuple[float, float | None]:
    """Coverage and risk (None when nothing is answered) of a fitted threshold on labelled outputs."""
    values = outputs["probs"].max(1) if fit.score == "confidence" else outputs[fit.score]
    answered = values >= fit.threshold if fit.score == "confidence" else values <= fit.threshold
    wrong = outputs["probs"].argmax(1) != labels
    return float(answered.mean()), (float(wrong[answered].mean()) if answered.any() else None)


def as_calibrate(logits: dict, val_labels: torch.Tensor, test_labels: np.ndarray, scores: tuple) -> dict[str, Any]:
    """The CLI's protocol: temperature on one half of the validation carve, the threshold on the other."""
    order = np.random.default_rng(0).permutation(len(val_labels))  # as freetickets calibrate splits
    first, second = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    fit_t = fit_temperature(logits["val"][:, first], val_labels[first])
    cal = outputs_of(logits["val"][:, second], fit_t.temperature)
    test = outputs_of(logits["test"], fit_t.temperature)
    rows: dict[str, Any] = {"temperature": fit_t.temperature, "n": len(second), "fits": {}}
    for score in scores:
        for risk in RISKS:
            try:
                fit = fit_threshold(cal, val_labels[second].numpy(), score=score, target_risk=risk, delta=DELTA)
            except InfeasibleRiskError:
                rows["fits"][f"{score}@{risk}"] = None
                continue
            coverage, test_risk = realised(test, test_labels, fit)
            rows["fits"][f"{score}@{risk}"] = {
                "threshold": fit.threshold,
                "calibration_coverage": fit.coverage,
                "test_coverage": coverage,
                "test_risk": test_risk,
                "held": test_risk is None or test_risk <= risk,
            }
    return rows


def repeated(logits: dict, val_labels: torch.Tensor, test_labels: np.ndarray, scores: tuple, splits: int) -> dict:
    """Temperature on the validation carve; threshold and sets on half the test split, scored on the other half."""
    temperature = fit_temperature(logits["val"], val_labels).temperature
    test = outputs_of(logits["test"], temperature)
    rng = np.random.default_rng(1)
    cells: dict[str, dict[str, list]] = {}
    for _ in range(splits):
        order = rng.permutation(len(test_labels))
        cal_rows, eval_rows = order[: len(order) // 2], order[len(order) // 2 :]
        cal = {k: v[cal_rows] for k, v in test.items()}
        held_out = {k: v[eval_rows] for k, v in test.items()}
        for score in scores:
            for risk in RISKS:
                cell = cells.setdefault(f"{score}@{risk}", {"coverage": [], "risk": [], "exceeded": [], "refused": []})
                try:
                    fit = fit_threshold(cal, test_labels[cal_rows], score=score, target_risk=risk, delta=DELTA)
                except InfeasibleRiskError:  # answers nothing: coverage 0, and the risk bound cannot fail
                    cell["refused"].append(True)
                    cell["coverage"].append(0.0)
                    cell["exceeded"].append(False)
                    continue
                coverage, test_risk = realised(held_out, test_labels[eval_rows], fit)
                cell["refused"].append(False)
                cell["coverage"].append(coverage)
                cell["exceeded"].append(test_risk is not None and test_risk > risk)
                if test_risk is not None:
                    cell["risk"].append(test_risk)
        for conformal in ("lac", "aps"):
            fit = fit_conformal(cal["probs"], test_labels[cal_rows], alpha=ALPHA, score=conformal)
            sets = prediction_sets(held_out["probs"], fit.quantile, conformal)
            cell = cells.setdefault(f"conformal_{conformal}", {"coverage": [], "size": []})
            cell["coverage"].append(float(np.mean([y in s for y, s in zip(test_labels[eval_rows], sets, strict=True)])))
            cell["size"].append(float(np.mean([len(s) for s in sets])))
    summary: dict[str, Any] = {"temperature": temperature, "splits": splits, "n": len(test_labels) // 2}
    for key, cell in cells.items():
        summary[key] = {name: (float(np.mean(values)) if values else None) for name, values in cell.items()}
    return summary


def render_markdown(results: dict[str, Any]) -> str:
    preset, info = results["preset"], results["provenance"]
    accuracies = ", ".join(f"{100 * model['accuracy']:.2f}%" for model in results["models"].values())
    lines = [
        f"### Selective prediction, preset `{preset}`" + (SMOKE_NOTE if preset == "smoke" else ""),
        "",
        f"- command: `{info['command']}`",
        f"- date: {info['date_utc']}; commit: `{info['commit']}`; load average at start "
        f"{info['machine']['load_average_at_start']}; this invocation {results['wall_time_s'] / 60:.1f} min",
        f"- models: the `{preset}` preset's single dense model, dense ensemble (M=3) and EDST ensemble (M=3), "
        f"test accuracy {accuracies} (all 10,000 test images, uncalibrated top-1)",
        f"- delta = {DELTA}; Learn-then-Test over a fixed grid of 100 thresholds, exact binomial p-values, fallback "
        f"procedure (freetickets_hub/uncertainty/selective.py); conformal alpha = {ALPHA}",
        "",
        f"**As `freetickets calibrate` does it** (temperature on {results['cli_n']} images of the validation carve, "
        f"threshold on the other {results['cli_n']}; coverage and risk on the whole test split; "
        "'refused' = exit 3, nothing stored):",
        "",
    ]
    header = ["model", "score", *(f"R={r:g}: test coverage / risk" for r in RISKS)]
    rows = []
    for model in results["models"].values():
        for score in model["scores"]:
            cells = []
            for risk in RISKS:
                fit = model["as_calibrate"]["fits"][f"{score}@{risk}"]
                if fit is None:
                    cells.append("refused")
                else:
                    risk_text = "n/a" if fit["test_risk"] is None else f"{fit['test_risk']:.4f}"
                    cells.append(f"{fit['test_coverage']:.3f} / {risk_text}{'' if fit['held'] else ' (ABOVE R)'}")
            rows.append([model["label"], score, *cells])
    lines += [markdown_table(header, rows), ""]
    splits = results["splits"]
    lines += [
        f"**Larger calibration, {splits} random draws** (temperature on the validation carve; threshold on a random "
        f"{results['repeated_n']} of the test images, scored on the other {results['repeated_n']}): mean coverage, "
        "mean realised risk of the draws that answered, share of all draws whose realised risk exceeded R (a refusal "
        "cannot exceed it), share refused:",
        "",
    ]
    header = ["model", "score", *(f"R={r:g}" for r in RISKS)]
    rows = []
    for model in results["models"].values():
        for score in model["scores"]:
            cells = []
            for risk in RISKS:
                cell = model["repeated"][f"{score}@{risk}"]
                risk_text = "n/a" if cell["risk"] is None else f"{cell['risk']:.4f}"
                cells.append(f"{cell['coverage']:.3f} / {risk_text} / {cell['exceeded']:.2f} / {cell['refused']:.2f}")
            rows.append([model["label"], score, *cells])
    lines += [markdown_table(header, rows), ""]
    lines += ["Most coverage at a fixed risk (larger calibration, mean over draws):", ""]
    for model in results["models"].values():
        best = []
        for risk in RISKS:
            ranked = sorted(model["scores"], key=lambda s: -model["repeated"][f"{s}@{risk}"]["coverage"])
            top = model["repeated"][f"{ranked[0]}@{risk}"]["coverage"]
            best.append(f"R={risk:g}: " + (f"**{ranked[0]}** ({top:.3f})" if top > 0 else "none answers"))
        lines.append(f"- {model['label']}: " + "; ".join(best))
    lines += [
        "",
        f"Conformal sets at alpha = {ALPHA} (target coverage >= {1 - ALPHA:g}), same draws: coverage / mean set size:",
        "",
    ]
    rows = [
        [model["label"], *(f"{model['repeated'][f'conformal_{c}']['coverage']:.4f} / "
                           f"{model['repeated'][f'conformal_{c}']['size']:.3f}" for c in ("lac", "aps"))]
        for model in results["models"].values()
    ]  # fmt: skip
    lines += [markdown_table(["model", "LAC", "APS"], rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--output-dir", default=None, help="default: runs/quality-<preset> (shared with quality.py)")
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "fashion_mnist"))
    parser.add_argument("--splits", type=int, default=20, help="random calibration draws of the larger protocol")
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to leave it alone")
    args = parser.parse_args()
    started = time.time()
    info = provenance(started)
    out = Path(args.output_dir or REPO / "runs" / f"quality-{args.preset}")
    specs = [spec for spec in build_specs(PRESETS[args.preset], args.dataset, []) if spec.name in MODELS]
    for spec in specs:
        train_run(spec, out / spec.name)
    data = load_shared_data(specs)  # the trainer's validation carve
    config = EnsembleModel.from_pretrained(out / specs[0].name).config
    test = load_eval_split(args.dataset, config, split="test")  # all 10,000: no run trained on any of them
    test_labels = test.labels.numpy()
    accelerator = create_accelerator()
    models: dict[str, Any] = {}
    for spec in specs:
        logits = member_logits(out / spec.name, data.val.images, test.images, accelerator)
        scores = SELECTIVE_SCORES if logits["test"].shape[0] > 1 else ("confidence", "entropy")  # MI of one model: 0
        probs = combine_member_logits(logits["test"], 1.0).probs
        models[spec.name] = {
            "label": spec.label,
            "accuracy": float((probs.argmax(1).numpy() == test_labels).mean()),
            "scores": list(scores),
            "as_calibrate": as_calibrate(logits, data.val.labels, test_labels, scores),
            "repeated": repeated(logits, data.val.labels, test_labels, scores, args.splits),
        }
        print(f"done {spec.name}")
    first = next(iter(models.values()))
    results = {
        "preset": args.preset,
        "provenance": info,
        "delta": DELTA,
        "alpha": ALPHA,
        "risks": list(RISKS),
        "splits": args.splits,
        "cli_n": first["as_calibrate"]["n"],
        "repeated_n": first["repeated"]["n"],
        "models": models,
        "wall_time_s": round(time.time() - started, 1),
    }
    markdown = render_markdown(results)
    folder = out / "selective"
    folder.mkdir(parents=True, exist_ok=True)
    written = write_results(folder, results, markdown, args.results_md, f"selective-{args.preset}")
    print(markdown)
    print("wrote " + ", ".join(written))
    print(json.dumps({k: v["accuracy"] for k, v in models.items()}))


if __name__ == "__main__":
    main()
