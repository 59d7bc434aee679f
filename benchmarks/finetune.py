"""Fine-tuning released ensembles at a real size: three transfers, every mode against from-scratch and dense.

Bases (trained once per source and cached, by ``quality_runs.train_run``): the quality benchmark's EDST
ensemble (M=3, S=0.8, WRN-10-2) and its single dense model, at E=``--base-epochs`` on
``--base-train-images`` Fashion-MNIST images (all ten classes, or classes 0–4 for the 5–9 transfer).
Transfers (``finetune_data`` writes each as a parquet folder):

- ``fmnist-5-9``: classes 0–4 → 5–9, 5,200 train (200 of them the validation carve) / 5,000 test; OOD:
  1,000 test images of the held-out classes 0–4;
- ``digits``: scikit-learn's digits, 1,347 train (200 the carve) / 450 test, 8×8 resized to 28×28; OOD:
  1,000 Fashion-MNIST test images;
- ``shift``: Fashion-MNIST under impulse noise at severity 5 (a domain shift, same labels), 1,200 train /
  2,000 test; OOD: scikit-learn's 1,797 digits.

Stages (every run is its own cached folder; a rerun skips finished runs and resumes interrupted ones):

- ``sweep``: ``finetune --search-lr``'s grid (``training/lr_search.py``) on each transfer's validation
  carve at seed 0, the EDST base in the default mode: where the recipe's LR defaults come from;
- ``grid``: each row below at every seed. Workers started side by side share the work (a run is
  claimed by a lock file), so ``--stage grid &`` twice keeps two cores busy;
- ``report``: accuracy, calibrated NLL / ECE (temperature fitted on the run's carve), OOD AUROC (the
  calibrated ensemble's entropy), diversity before → after and wall time, as means over the seeds with
  95 % bootstrap intervals over the test images (paired across runs), and the issue-26 targets.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/finetune.py --stage sweep
    for worker in 1 2; do OMP_NUM_THREADS=1 python benchmarks/finetune.py --stage grid & done; wait
    python benchmarks/finetune.py --stage report   # ~4.8 h of training processes, ~3 h wall on 2 cores (RESULTS.md)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning thread pools on a shared CPU

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from finetune_data import write_class_subset, write_corrupted, write_digits
from ood_stats import Draws, bootstrap_detection, interval, separated
from quality import Preset, build_specs
from quality_report import markdown_table, provenance, provenance_lines, write_results
from quality_runs import REPO, claimed, train_run

from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.data import load_eval_split, run_validation_rows
from freetickets_hub.errors import FreeTicketsError
from freetickets_hub.evaluation import create_accelerator, run_inference
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.training.finetune import load_finetune_recipe, search_lr
from freetickets_hub.training.lr_search import Candidate, search_recipe
from freetickets_hub.uncertainty.calibration import fit_temperature
from freetickets_hub.uncertainty.metrics import classification_metrics, detection_metrics
from freetickets_hub.uncertainty.outputs import combine_member_logits

RECIPE = "training/recipes/finetune_small.yaml"
SECTION = "finetune"
SEEDS = (0, 1, 2)
DRAWS = 1000
DEFAULT_ROW = "frozen_masks"  # the default mode; the targets compare it with COMPARED
COMPARED = ("scratch", "dense")


@dataclass(frozen=True)
class Row:
    """One run of every transfer: which base, which mode, fine-tuned or from scratch."""

    name: str
    label: str
    base: str  # quality.py run name
    mode: str
    scratch: bool


ROWS = (
    Row("frozen_masks", "EDST fine-tuned, frozen-masks (default)", "edst_ensemble", "frozen-masks", False),
    Row("dst", "EDST fine-tuned, dst", "edst_ensemble", "dst", False),
    Row("linear_probe", "EDST fine-tuned, linear-probe", "edst_ensemble", "linear-probe", False),
    Row("scratch", "EDST recipe from scratch (random ERK masks, same steps)", "edst_ensemble", "frozen-masks", True),
    Row("dense", "one dense model fine-tuned", "single_dense", "frozen-masks", False),
    Row("dense_scratch", "one dense model from scratch (same steps)", "single_dense", "frozen-masks", True),
)


@dataclass(frozen=True)
class Target:
    """One transfer: its dataset folder, the bases' source classes, its OOD set and its ``--set`` items."""

    name: str
    description: str
    source: str  # the bases' training classes: "all" or "0-4"
    dataset: Path
    ood: tuple[str, str, int | None]  # load_eval_split source, split, max images
    ood_description: str
    sets: tuple[str, ...]


def targets(out: Path, fmnist: str) -> list[Target]:
    """The three transfers, their datasets written under ``out/data`` when missing."""
    data = out / "data"
    five_nine = write_class_subset(fmnist, [5, 6, 7, 8, 9], data / "fmnist_5_9", {"train": 5200, "test": None})
    zero_four = write_class_subset(fmnist, [0, 1, 2, 3, 4], data / "fmnist_0_4", {"train": None, "test": None})
    shift = write_corrupted(fmnist, "impulse_noise", 5, data / "fmnist_impulse5", {"train": 1200, "test": 2000})
    return [
        Target(
            "fmnist-5-9",
            "Fashion-MNIST classes 0–4 → 5–9: 5,200 train (200 the validation carve) / 5,000 test",
            "0-4",
            five_nine,
            (str(zero_four), "test", 1000),
            "1,000 test images of the held-out classes 0–4",
            ("val_size=200",),
        ),
        Target(
            "digits",
            "scikit-learn digits: 1,347 train (200 the carve) / 450 test, 8×8 resized to 28×28",
            "all",
            write_digits(data / "digits"),
            (fmnist, "test", 1000),
            "1,000 Fashion-MNIST test images",
            ("val_size=200",),
        ),
        Target(
            "shift",
            "Fashion-MNIST under impulse noise, severity 5 (the base's ten classes): 1,200 train (200 the carve) "
            "/ 2,000 test",
            "all",
            shift,
            ("sklearn:digits", "test", None),
            "scikit-learn's 1,797 digits",
            ("val_size=200",),
        ),
    ]


def bases(out: Path, fmnist: str, source: str, preset: Preset) -> dict[str, Path]:
    """The EDST ensemble and the dense model pre-trained on ``source``'s classes (trained when missing)."""
    dataset = fmnist if source == "all" else str(out / "data" / "fmnist_0_4")
    folders = {}
    for spec in build_specs(preset, dataset, []):
        if spec.name in ("edst_ensemble", "single_dense"):
            folders[spec.name] = out / f"base_{source}" / spec.name
            train_run(spec, folders[spec.name])
    return folders


def run_sets(target: Target, seed: int, extra: list[str]) -> list[str]:
    """The ``--set`` items of one fine-tune: the transfer's, the seed, then the command line's."""
    return [*target.sets, f"seed={seed}", *extra]


# -- the sweep ------------------------------------------------------------------------------------------


def sweep(out: Path, target: Target, base: Path, extra: list[str]) -> dict[str, Any]:
    """``--search-lr``'s scores on ``target`` at seed 0 (cached in ``sweep/<target>/scores.json``)."""
    path = out / "sweep" / target.name / "scores.json"
    recipe = load_finetune_recipe(
        REPO / RECIPE,
        run_sets(target, 0, extra),
        base_model=str(base),
        dataset=str(target.dataset),
        mode="frozen-masks",
    )
    centre = {"recipe_lr": recipe.lr, "recipe_backbone_lr": recipe.backbone_lr, "epochs": recipe.epochs}
    if path.is_file():
        cached = json.loads(path.read_text())
        if {key: cached.get(key) for key in centre} != centre:
            raise FreeTicketsError(f"{path} was swept around other LRs ({cached['recipe_lr']:g}, "
                                   f"{cached['recipe_backbone_lr']:g}); choose another --output-dir")  # fmt: skip
        return cached
    started = time.perf_counter()
    _, scores = search_lr(recipe, path.parent / "work")
    result = {**centre, "scores": scores, "wall_time_s": round(time.perf_counter() - started, 1)}
    write_text_atomic(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def sweep_table(sweeps: dict[str, dict[str, Any]]) -> tuple[str, tuple[float, float] | None]:
    """One row per LR pair: validation NLL on each transfer and the mean rank; and the pair of lowest mean rank."""
    if not sweeps:
        return "", None
    pairs = [(s["lr"], s["backbone_lr"]) for s in next(iter(sweeps.values()))["scores"]]
    if any([(s["lr"], s["backbone_lr"]) for s in block["scores"]] != pairs for block in sweeps.values()):
        raise FreeTicketsError("the transfers were swept over different LR grids; sweep them again together")
    nll = {name: [s["val_nll"] for s in block["scores"]] for name, block in sweeps.items()}
    ranks = np.mean([np.argsort(np.argsort(values, kind="stable"), kind="stable") + 1 for values in nll.values()], 0)
    best = min(range(len(pairs)), key=lambda i: (ranks[i], np.mean([v[i] for v in nll.values()])))
    header = ["lr (heads)", "backbone_lr", *[f"{name} val NLL" for name in nll], "mean rank"]
    rows = [
        [f"{lr:g}", f"{blr:g}", *[f"{v[i]:.4f}" for v in nll.values()], f"{ranks[i]:.2f}" + (" ◀" if i == best else "")]
        for i, (lr, blr) in enumerate(pairs)
    ]
    return markdown_table(header, rows), pairs[best]


# -- the grid -------------------------------------------------------------------------------------------


def finetune_run(base: Path, target: Target, folder: Path, row: Row, sets: list[str], hold: int) -> None:
    """Fine-tune ``row`` into ``folder`` in a subprocess (resuming a checkpointed attempt).

    ``hold`` is the folder's claim (``quality_runs.claimed``), inherited by the subprocess.
    """
    spec_path = folder / "benchmark_spec.json"
    recipe_text = (REPO / RECIPE).read_text()
    spec = {"base": str(base), "dataset": str(target.dataset), "mode": row.mode, "scratch": row.scratch}
    spec |= {"sets": sets, "recipe": recipe_text}
    stored = json.loads(spec_path.read_text()) if spec_path.exists() else {**spec, "attempts_s": []}
    if {k: stored.get(k) for k in spec} != spec:
        raise FreeTicketsError(f"{folder} holds another run (recipe or settings changed); choose another --output-dir")
    command = [sys.executable, "-m", "freetickets_hub.cli", "finetune", str(base), "--dataset", str(target.dataset)]
    command += ["--output-dir", str(folder), "--recipe", str(REPO / RECIPE), "--mode", row.mode]
    command += [arg for item in sets for arg in ("--set", item)]
    command += ["--from-scratch"] if row.scratch else []
    command += ["--resume"] if (folder / "checkpoints").is_dir() else []
    print(f"fine-tune {folder.relative_to(folder.parents[2])}: log in {folder / 'finetune.log'}", flush=True)
    started = time.perf_counter()
    with open(folder / "finetune.log", "a", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False, pass_fds=(hold,))
    stored["attempts_s"].append(round(time.perf_counter() - started, 2))
    write_text_atomic(spec_path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    if result.returncode:
        tail = (folder / "finetune.log").read_text(errors="replace").splitlines()[-20:]
        raise FreeTicketsError(f"fine-tuning {folder} failed (exit {result.returncode}):\n" + "\n".join(tail))


def evaluate(folder: Path, target: Target, accelerator: Any) -> None:
    """Per-image test results after a temperature fitted on the run's own carve, into ``benchmark_eval.npz``."""
    summary = json.loads((folder / "train_summary.json").read_text())
    recipe = summary["recipe"]
    model = EnsembleModel.from_pretrained(folder)
    val = load_eval_split(
        str(target.dataset), model.config, split=recipe["train_split"], rows=run_validation_rows(recipe)
    )
    test = load_eval_split(str(target.dataset), model.config, split=recipe["test_split"])
    source, split, count = target.ood
    ood = load_eval_split(source, model.config, split=split, max_samples=count, require_labels=False)

    def logits(images: torch.Tensor) -> torch.Tensor:
        return run_inference(model, images, accelerator, batch_size=500, desc=folder.name).member_logits

    val_logits, test_logits, ood_logits = logits(val.images), logits(test.images), logits(ood.images)
    temperature = fit_temperature(val_logits, val.labels).temperature
    test_out, ood_out = combine_member_logits(test_logits, temperature), combine_member_logits(ood_logits, temperature)
    metrics = {
        "temperature": temperature,
        "uncalibrated": classification_metrics(combine_member_logits(test_logits, 1.0).probs, test.labels),
        "calibrated": classification_metrics(test_out.probs, test.labels),
        "ood_auroc": detection_metrics(-test_out.entropy, -ood_out.entropy)["auroc"],
        "diversity": summary.get("finetune", {}).get("diversity"),
        "wall_time_s": sum(json.loads((folder / "benchmark_spec.json").read_text())["attempts_s"]),
        "total_steps": summary["total_steps"],
        "training_flops": summary["costs"]["training_flops"],
    }
    picked = test_out.probs[torch.arange(len(test.labels)), test.labels]
    arrays = {
        "correct": (test_out.probs.argmax(1) == test.labels).numpy().astype(np.float64),
        "nll": -torch.log(picked.clamp_min(1e-12)).numpy().astype(np.float64),
        "in_score": (-test_out.entropy).numpy().astype(np.float64),
        "out_score": (-ood_out.entropy).numpy().astype(np.float64),
    }
    partial = folder / "benchmark_eval.partial.npz"
    np.savez(partial, **arrays)
    os.replace(partial, folder / "benchmark_eval.npz")
    write_text_atomic(folder / "benchmark_eval.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def work(out: Path, chosen: list[Target], seeds: list[int], folders: dict[str, dict[str, Path]]) -> Iterator[Any]:
    """Every run, the ones the targets compare first at every seed (a grid cut short still decides them)."""
    first = [row for row in ROWS if row.name in (DEFAULT_ROW, *COMPARED)]
    rest = [row for row in ROWS if row not in first]
    for rows in (first, rest):
        for seed in seeds:
            for target in chosen:
                for row in rows:
                    folder = out / target.name / f"seed{seed}" / row.name
                    yield target, seed, row, folders[target.source][row.base], folder


def grid(
    out: Path, chosen: list[Target], seeds: list[int], folders: dict[str, dict[str, Path]], extra: list[str]
) -> None:
    """Fine-tune and evaluate every unfinished run this worker can claim."""
    accelerator = create_accelerator()
    for target, seed, row, base, folder in work(out, chosen, seeds, folders):
        if (folder / "benchmark_eval.json").is_file():
            continue
        with claimed(folder) as hold:
            if hold is None:
                continue
            if not (folder / "train_summary.json").is_file():
                finetune_run(base, target, folder, row, run_sets(target, seed, extra), hold)
            evaluate(folder, target, accelerator)


# -- the report -----------------------------------------------------------------------------------------


def load_row(out: Path, target: Target, row: Row, seeds: list[int]) -> dict[int, tuple[dict[str, Any], Any]]:
    """Per evaluated seed of ``row``: its ``benchmark_eval.json`` metrics and per-image arrays."""
    found = {}
    for seed in seeds:
        folder = out / target.name / f"seed{seed}" / row.name
        if (folder / "benchmark_eval.json").is_file():
            found[seed] = (
                json.loads((folder / "benchmark_eval.json").read_text()),
                np.load(folder / "benchmark_eval.npz"),
            )
    return found


def mean_draws(values: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    """The mean over seeds of a per-image mean, on every bootstrap draw of the images."""
    return counts @ np.mean(values, axis=0) / counts.shape[1]


def _mean_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def summarize(rows: dict[str, dict[int, Any]], draws: Draws) -> dict[str, Any]:
    """Per row: means over seeds with bootstrap intervals; per compared row: the paired difference to the default."""
    table: dict[str, Any] = {}
    for name, found in rows.items():
        if not found:
            continue
        metrics = [m for m, _ in found.values()]
        arrays = [a for _, a in found.values()]
        auroc = np.mean([bootstrap_detection(a["in_score"], a["out_score"], draws)["auroc"] for a in arrays], 0)
        div = [m["diversity"] for m in metrics if m["diversity"]]
        table[name] = {
            "seeds": sorted(found),
            "accuracy": float(np.mean([a["correct"].mean() for a in arrays])),
            "accuracy_interval": interval(mean_draws([a["correct"] for a in arrays], draws.inside)),
            "nll": float(np.mean([a["nll"].mean() for a in arrays])),
            "nll_interval": interval(mean_draws([a["nll"] for a in arrays], draws.inside)),
            "ece": float(np.mean([m["calibrated"]["ece"] for m in metrics])),
            "ece_sd": float(np.std([m["calibrated"]["ece"] for m in metrics])),
            "ood_auroc": float(np.mean([m["ood_auroc"] for m in metrics])),
            "ood_auroc_interval": interval(auroc),
            "diversity": {
                when: {k: _mean_known([d[when][k] for d in div]) for k in ("disagreement", "feature_cka")}
                for when in ("before", "after")
                if div and all(d.get(when) for d in div)
            },
            "wall_time_s": float(np.mean([m["wall_time_s"] for m in metrics])),
            "total_steps": metrics[0]["total_steps"],
        }
    for name in COMPARED:
        if DEFAULT_ROW not in table or name not in table:
            continue
        seeds = sorted(set(rows[DEFAULT_ROW]) & set(rows[name]))
        if not seeds:
            continue
        comparison: dict[str, Any] = {"seeds": seeds}
        for key, sign in (("correct", 1.0), ("nll", -1.0)):  # positive = the default fine-tune is better
            diffs = [sign * (rows[DEFAULT_ROW][s][1][key] - rows[name][s][1][key]) for s in seeds]
            per_seed = [float(d.mean()) for d in diffs]
            boot = mean_draws(diffs, draws.inside)
            verdict = "better" if separated(boot, per_seed) and np.mean(per_seed) > 0 else "tie"
            verdict = "worse" if separated(boot, per_seed) and np.mean(per_seed) < 0 else verdict
            comparison[key] = {"mean": float(np.mean(per_seed)), "interval": interval(boot), "per_seed": per_seed}
            comparison[key]["verdict"] = verdict
        table[f"{DEFAULT_ROW}_vs_{name}"] = comparison
    return table


def _with_interval(value: float, bounds: list[float]) -> str:
    return f"{value:.4f} [{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _change(div: dict[str, Any], key: str) -> str:
    values = [div.get(when, {}).get(key) for when in ("before", "after")]
    return "n/a" if None in values else f"{values[0]:.3f} → {values[1]:.3f}"


def render(results: dict[str, Any]) -> str:
    """The RESULTS.md section: provenance, the sweep, one table per transfer, and the targets."""
    settings = results["settings"]
    lines = ["### Fine-tuning released ensembles at a real size (issue 26)", ""]
    lines += provenance_lines(results["provenance"], results["wall_time_s"], results["training_s"])
    lines += [
        "- bases: quality.py's EDST ensemble (M=3, S=0.8) and single dense model, WRN-10-2, "
        f"E={settings['base_epochs']} on {settings['base_train_images']:,} Fashion-MNIST images, seed 0 "
        "(the same bases at every fine-tune seed)",
        f"- fine-tuning: `{RECIPE}` as committed (lr {settings['lr']:g}, backbone_lr {settings['backbone_lr']:g}, "
        f"augment {settings['augment']}), `--set seed=S` for S in {settings['seeds']}; the temperature is fitted on "
        "each run's own validation carve",
        "- numbers: means over the seeds; [95 % bootstrap interval] over the test images (1,000 draws shared by "
        "every run, so the differences are paired); ECE ± its sd over seeds; OOD AUROC from the calibrated "
        "ensemble's entropy; diversity = pairwise disagreement and linear CKA of the pooled features, before "
        "(base members, base heads) → after",
        "",
    ]
    if results.get("sweep"):
        lines += [
            f"#### LR sweep (`--search-lr`'s grid at seed 0, {results['sweep_epochs']} epochs a candidate, "
            "validation carve only)",
            "",
            results["sweep"],
            "",
            "The sweep's pick (lowest mean rank): lr {:g}, backbone_lr {:g}; the recipe's: lr {:g}, "
            "backbone_lr {:g}.".format(*results["sweep_best"], settings["lr"], settings["backbone_lr"]),
            "",
        ]
    for name, block in results["targets"].items():
        lines += [f"#### {name}: {block['description']}", "", f"OOD set: {block['ood']}", ""]
        header = [
            "run",
            "seeds",
            "acc",
            "NLL (T)",
            "ECE (T)",
            "OOD AUROC",
            "disagree",
            "feature CKA",
            "steps",
            "wall s",
        ]
        body = []
        for row in ROWS:
            r = block["table"].get(row.name)
            if r is None:
                continue
            body.append(
                [
                    row.label,
                    len(r["seeds"]),
                    _with_interval(r["accuracy"], r["accuracy_interval"]),
                    _with_interval(r["nll"], r["nll_interval"]),
                    f"{r['ece']:.4f} ± {r['ece_sd']:.4f}",
                    _with_interval(r["ood_auroc"], r["ood_auroc_interval"]),
                    _change(r["diversity"], "disagreement"),
                    _change(r["diversity"], "feature_cka"),
                    r["total_steps"],
                    f"{r['wall_time_s']:.0f}",
                ]
            )
        lines += [markdown_table(header, body), ""]
    lines += ["#### Targets: the default fine-tune against from-scratch and one dense model fine-tuned", ""]
    body = []
    for name, block in results["targets"].items():
        for other in COMPARED:
            c = block["table"].get(f"{DEFAULT_ROW}_vs_{other}")
            if c is None:
                continue
            cells = [
                f"{c[k]['mean']:+.4f} [{c[k]['interval'][0]:+.4f}, {c[k]['interval'][1]:+.4f}] {c[k]['verdict']}"
                for k in ("correct", "nll")
            ]
            body.append([name, other, len(c["seeds"]), *cells])
    header = ["transfer", "against", "seeds", "Δ accuracy (+ = default better)", "Δ NLL (T) (+ = default better)"]
    lines += [markdown_table(header, body), ""]
    lines.append(
        "A target (≥) holds unless the difference is *worse*: its interval excludes 0 and every seed agrees; "
        "*better* is the same on the other side; *tie* otherwise."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("sweep", "grid", "report"), required=True)
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "finetune"))
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "fashion_mnist"))
    parser.add_argument("--base-train-images", type=int, default=10_000)
    parser.add_argument("--base-epochs", type=int, default=5)
    parser.add_argument("--targets", nargs="+", default=None, help="default: all three")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every fine-tune")
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to leave it alone")
    args = parser.parse_args()
    started = time.time()
    out = Path(args.output_dir)
    preset = Preset(args.base_epochs, args.base_train_images, 1000, 2000, update_interval=50, corruption_images=0)
    every = targets(out, args.dataset)
    chosen = [t for t in every if args.targets is None or t.name in args.targets]
    folders = {source: bases(out, args.dataset, source, preset) for source in sorted({t.source for t in chosen})}
    if args.stage == "sweep":
        for target in chosen:
            sweep(out, target, folders[target.source]["edst_ensemble"], args.set)
    if args.stage == "grid":
        grid(out, chosen, args.seeds, folders, args.set)
    if args.stage != "report":
        return
    recipe = load_finetune_recipe(REPO / RECIPE, args.set)
    sweeps = {
        t.name: json.loads(p.read_text()) for t in chosen if (p := out / "sweep" / t.name / "scores.json").is_file()
    }
    table, best = sweep_table(sweeps)
    results: dict[str, Any] = {
        "provenance": provenance(started),
        "settings": {
            "base_epochs": args.base_epochs,
            "base_train_images": args.base_train_images,
            "seeds": args.seeds,
            "lr": recipe.lr,
            "backbone_lr": recipe.backbone_lr,
            "augment": recipe.augment,
        },
        "sweep": table,
        "sweep_best": best,
        "sweep_epochs": search_recipe(recipe, Candidate(recipe.lr, recipe.backbone_lr)).epochs,
        "targets": {},
    }
    training_s = 0.0
    for target in chosen:
        rows = {row.name: load_row(out, target, row, args.seeds) for row in ROWS}
        n_test = next((len(a["correct"]) for found in rows.values() for _, a in found.values()), 0)
        n_ood = next((len(a["out_score"]) for found in rows.values() for _, a in found.values()), 0)
        if not n_test:
            continue
        training_s += sum(m["wall_time_s"] for found in rows.values() for m, _ in found.values())
        block = {"description": target.description, "ood": target.ood_description}
        block["table"] = summarize(rows, Draws.make(n_test, n_ood, DRAWS, seed=0))
        results["targets"][target.name] = block
    results.update(wall_time_s=round(time.time() - started, 1), training_s=round(training_s, 1))
    markdown = render(results)
    print(markdown)
    print("wrote " + ", ".join(write_results(out, results, markdown, args.results_md, SECTION)))


if __name__ == "__main__":
    main()
