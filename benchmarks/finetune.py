"""Fine-tuning released ensembles on small new tasks: three modes against from-scratch and a dense model.

Bases (trained once and cached, by ``quality_runs.train_run``): the quality benchmark's EDST ensemble
(M=3, S=0.8, WRN-10-2) and its single dense model, built by ``quality.build_specs`` from a preset
(E=5, ``--base-train-images`` Fashion-MNIST images). Two transfers:

- ``digits``: bases trained on all ten Fashion-MNIST classes, fine-tuned on scikit-learn's digits
  (1,797 8×8 images, a seeded stratified 75/25 train/test split, resized to 28×28 by the base's
  preprocessing);
- ``fmnist-5-9``: bases trained on Fashion-MNIST classes 0–4, fine-tuned on ``--target-train-images``
  images of classes 5–9.

Each target is fine-tuned with ``training/recipes/finetune_small.yaml``: the EDST ensemble in each
mode (frozen-masks, dst, linear-probe), (a) the same recipe from scratch (random init, random ERK
masks at S=0.8, same steps), (b) the dense model fine-tuned (frozen-masks mode on a dense model is
plain fine-tuning). Reported: test accuracy, NLL / ECE after a temperature fitted on the fine-tune's
validation carve, diversity before → after (the base members on the new test images, with their own
heads; then the fine-tuned ones), training FLOPs and wall time. Every run is its own process and is
cached in ``OUTPUT_DIR``; running again skips finished runs and resumes interrupted ones.

    nice -n 10 python benchmarks/finetune.py            # ~25 min on an idle 2-core CPU (estimate)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning thread pools on a shared CPU

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality import Preset, build_specs
from quality_report import markdown_table, provenance, provenance_lines, write_results
from quality_runs import REPO, train_run

from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.data import run_validation_rows
from freetickets_hub.errors import FreeTicketsError
from freetickets_hub.evaluation import create_accelerator, load_eval_split, run_inference
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.calibration import fit_temperature
from freetickets_hub.uncertainty.metrics import classification_metrics
from freetickets_hub.uncertainty.outputs import combine_member_logits

RECIPE = "training/recipes/finetune_small.yaml"
SEED = 0
SECTION = "finetune"
RUNS = (  # name, label, base, mode, from scratch
    ("frozen_masks", "EDST fine-tuned, frozen-masks", "edst_ensemble", "frozen-masks", False),
    ("dst", "EDST fine-tuned, dst", "edst_ensemble", "dst", False),
    ("linear_probe", "EDST fine-tuned, linear-probe", "edst_ensemble", "linear-probe", False),
    ("scratch", "(a) same recipe from scratch (static sparse)", "edst_ensemble", "frozen-masks", True),
    ("dense", "(b) one dense model fine-tuned", "single_dense", "frozen-masks", False),
)
HEADER = [
    "run",
    "acc",
    "NLL (T)",
    "ECE (T)",
    "disagree before → after",
    "MI before → after",
    "feature CKA before → after",
    "train FLOPs",
    "steps",
    "wall s",
]


def write_class_subset(source: str, classes: list[int], dest: Path, counts: dict[str, int | None]) -> Path:
    """Write the images of ``classes`` (relabelled 0..n-1, names kept) as a parquet dataset folder."""
    from datasets import ClassLabel, load_dataset

    if (dest / "data").is_dir():
        return dest
    splits = load_dataset(source)
    for split, count in counts.items():
        ds = splits[split]
        names = ds.features["label"].names
        ds = ds.filter(lambda y: y in classes, input_columns="label")
        ds = ds.select(range(min(count, len(ds)))) if count is not None else ds
        ds = ds.map(lambda y: {"label": classes.index(y)}, input_columns="label")
        ds = ds.cast_column("label", ClassLabel(names=[names[c] for c in classes]))
        (dest / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(dest / "data" / f"{split}-00000-of-00001.parquet"))
    return dest


def write_digits(dest: Path) -> Path:
    """scikit-learn's digits as a parquet dataset folder: a seeded, stratified 75/25 train/test split."""
    from datasets import ClassLabel, Dataset, Features, Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if (dest / "data").is_dir():
        return dest
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), values 0..16
    rows = np.arange(len(images))
    train, test = train_test_split(rows, test_size=0.25, random_state=SEED, stratify=digits.target)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    (dest / "data").mkdir(parents=True, exist_ok=True)
    for split, index in (("train", train), ("test", test)):
        columns = {"image": list(images[index]), "label": digits.target[index].tolist()}
        ds = Dataset.from_dict(columns, features=features)
        ds.to_parquet(str(dest / "data" / f"{split}-00000-of-00001.parquet"))
    return dest


def finetune_run(base: Path, dataset: Path, folder: Path, mode: str, scratch: bool, sets: list[str]) -> float:
    """Fine-tune in a subprocess unless ``folder`` is finished; returns the seconds of every attempt."""
    spec_path = folder / "benchmark_spec.json"
    spec = {"base": str(base), "dataset": str(dataset), "mode": mode, "scratch": scratch, "sets": sets}
    stored = json.loads(spec_path.read_text()) if spec_path.exists() else {**spec, "attempts_s": []}
    if {k: stored.get(k) for k in spec} != spec:
        raise FreeTicketsError(f"{folder} holds another run ({stored}); choose another --output-dir")
    if (folder / "model.safetensors").exists() and (folder / "train_summary.json").exists():
        print(f"skip {folder.name}: done")
        return sum(stored["attempts_s"])
    command = [sys.executable, "-m", "freetickets_hub.cli", "finetune", str(base), "--dataset", str(dataset)]
    command += ["--output-dir", str(folder), "--recipe", str(REPO / RECIPE), "--mode", mode]
    command += [arg for item in sets for arg in ("--set", item)]
    command += ["--from-scratch"] if scratch else []
    command += ["--resume"] if (folder / "checkpoints").is_dir() else []
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fine-tune {folder.parent.name}/{folder.name}: log in {folder / 'finetune.log'}")
    started = time.perf_counter()
    with open(folder / "finetune.log", "a", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    stored["attempts_s"].append(round(time.perf_counter() - started, 2))
    write_text_atomic(spec_path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    if result.returncode:
        tail = (folder / "finetune.log").read_text(errors="replace").splitlines()[-20:]
        raise FreeTicketsError(f"fine-tuning {folder} failed (exit {result.returncode}):\n" + "\n".join(tail))
    return sum(stored["attempts_s"])


def evaluate(folder: Path, dataset: Path, accelerator: Any) -> dict[str, Any]:
    """Test metrics before and after a temperature fitted on the run's own validation carve."""
    summary = json.loads((folder / "train_summary.json").read_text())
    recipe = summary["recipe"]
    model = EnsembleModel.from_pretrained(folder)
    val_rows = run_validation_rows(recipe, str(dataset))
    val = load_eval_split(str(dataset), model.config, split=recipe["train_split"], rows=val_rows)
    test = load_eval_split(str(dataset), model.config, split=recipe["test_split"])

    def logits(images: Any) -> Any:
        return run_inference(model, images, accelerator, batch_size=500, desc=folder.name).member_logits

    val_logits, test_logits = logits(val.images), logits(test.images)
    fit = fit_temperature(val_logits, val.labels)
    metrics = {
        name: classification_metrics(combine_member_logits(test_logits, t).probs, test.labels)
        for name, t in (("uncalibrated", 1.0), ("calibrated", fit.temperature))
    }
    return {"temperature": fit.temperature, "test_images": len(test), "val_images": len(val), **metrics}


def row(label: str, result: dict[str, Any]) -> list[Any]:
    cal = result["calibrated"]
    div = result.get("diversity")

    def change(key: str) -> str:
        values = [div[when][key] for when in ("before", "after")] if div else [None]
        return "n/a" if None in values else f"{values[0]:.3f} → {values[1]:.3f}"

    return [
        label,
        result["uncalibrated"]["accuracy"],
        cal["nll"],
        cal["ece"],
        change("disagreement"),
        change("mutual_information"),
        change("feature_cka"),
        f"{result['training_flops']:.3g}",
        str(result["total_steps"]),
        f"{result['wall_time_s']:.0f}",
    ]


def render(results: dict[str, Any]) -> str:
    lines = ["### Fine-tuning released ensembles (small-data transfer)", ""]
    lines += provenance_lines(results["provenance"], results["wall_time_s"], results["training_s"])
    settings = results["settings"]
    lines += [
        f"- bases: quality.py's EDST ensemble and single dense model at E={settings['base_epochs']}, "
        f"{settings['base_train_images']} training images (digits transfer: all ten classes; 5–9 transfer: "
        "classes 0–4)",
        f"- fine-tuning: `{RECIPE}`, overrides per target below; every member's backbone at `backbone_lr`, "
        "its new head at `lr`; the temperature is fitted on the fine-tune's validation carve",
        "- diversity: on the new test split; *before* = the base members with their own heads "
        "(the base label space), *after* = the fine-tuned members; feature CKA = mean pairwise linear CKA "
        "of the pooled pre-logit features (1 = identical representations)",
        "",
    ]
    for target, block in results["targets"].items():
        lines += [f"#### {target}: {block['description']}", "", f"overrides: `{' '.join(block['sets']) or '-'}`", ""]
        lines.append(markdown_table(HEADER, [row(r["label"], r) for r in block["runs"].values()]))
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "finetune"))
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "fashion_mnist"))
    parser.add_argument("--base-train-images", type=int, default=4000)
    parser.add_argument("--target-train-images", type=int, default=1000)
    parser.add_argument("--digits-train-images", type=int, default=None, help="cap after the carve (default: 1,047)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every fine-tune")
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to leave it alone")
    args = parser.parse_args()
    started = time.time()
    info = provenance(started)
    out = Path(args.output_dir)
    preset = Preset(5, args.base_train_images, 1000, 2000, update_interval=20, corruption_images=0)
    data = out / "data"
    sources = {
        "all": Path(args.dataset),
        "0-4": write_class_subset(args.dataset, [0, 1, 2, 3, 4], data / "fmnist_0_4", {"train": None, "test": None}),
    }
    targets = {
        "digits": (
            f"scikit-learn digits, 1,347 train (300 of them the validation carve, "
            f"{args.digits_train_images or 1047} trained on) / 450 test, 8×8 resized to 28×28",
            "all",
            write_digits(data / "digits"),
            ["augment=crop", "val_size=300"]
            + ([f"max_train_samples={args.digits_train_images}"] if args.digits_train_images else []),
        ),
        "fmnist-5-9": (
            f"Fashion-MNIST classes 5–9, {args.target_train_images} train (200 of them the validation carve) / "
            "2,000 test",
            "0-4",
            write_class_subset(
                args.dataset, [5, 6, 7, 8, 9], data / "fmnist_5_9", {"train": args.target_train_images, "test": 2000}
            ),
            ["val_size=200"],
        ),
    }
    training_s = 0.0
    accelerator = create_accelerator()
    settings = {"base_epochs": preset.epochs, "base_train_images": args.base_train_images, "recipe": RECIPE}
    results: dict[str, Any] = {"targets": {}, "provenance": info, "settings": settings}
    for target, (description, source_name, dataset, sets) in targets.items():  # each target's table as it is done
        bases: dict[str, Path] = {}
        for spec in build_specs(preset, str(sources[source_name]), []):
            if spec.name in ("edst_ensemble", "single_dense"):
                bases[spec.name] = out / f"base_{source_name}" / spec.name
                training_s += train_run(spec, bases[spec.name])["benchmark_wall_time_s"]
        sets = [*sets, *args.set]
        block: dict[str, Any] = {"description": description, "sets": sets, "runs": {}}
        for name, label, base_name, mode, scratch in RUNS:
            folder = out / target / name
            seconds = finetune_run(bases[base_name], dataset, folder, mode, scratch, sets)
            training_s += seconds
            summary = json.loads((folder / "train_summary.json").read_text())
            block["runs"][name] = {
                "label": label,
                **evaluate(folder, dataset, accelerator),
                "diversity": summary.get("finetune", {}).get("diversity"),
                "training_flops": summary["costs"]["training_flops"],
                "total_steps": summary["total_steps"],
                "wall_time_s": seconds,
            }
        results["targets"][target] = block
        results.update(wall_time_s=round(time.time() - started, 1), training_s=training_s)
        markdown = render(results)
        written = write_results(out, results, markdown, args.results_md, SECTION)
        print(markdown)
        print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
