"""Sparse ensembles vs dense baselines on Fashion-MNIST, side by side, with their costs.

Five methods on the Fashion-MNIST recipe architecture (WRN-10-2): a single dense model, a dense
ensemble (M=3), a DST ensemble, an EDST ensemble and a static sparse ensemble (M=3, S=0.8 each).
A dense/DST/static member trains E epochs; EDST trains t_ex + M·t_re = 0.6·E + 3·0.4·E = 1.8·E
epochs, the paper's proportions (t_ex 150 + 3 × 100 against 250). Every member sees the same LR
shape: 0.1 for 0.6·E epochs, then 0.01 and 0.001 for 0.2·E epochs each (dense/DST: milestones at 0.6
and 0.8 of E; EDST: exploration at 0.1, then each refinement 0.01 → 0.001 after a forced escape).

Each method trains in its own process into ``OUTPUT_DIR/<method>``; running the command again skips
finished methods and resumes an interrupted one. Writes ``results.json``, ``results.md`` and
``quality.png`` (accuracy and NLL against training FLOPs), and puts the tables into
``benchmarks/RESULTS.md`` (section ``quality-<preset>``).

    python benchmarks/quality.py --preset smoke    # ~5 min on an idle 2-core CPU
    python benchmarks/quality.py --preset full     # ~75 min on an idle 2-core CPU (E=5, 40,000 images)
    python benchmarks/quality.py --preset gpu      # WRN-16-8, E=10, bf16, all data: one H100, ~10 min (estimate)

``--edst-set KEY=VALUE`` changes the EDST run only (e.g. a schedule from ``recipe_search.py``), so the
four other methods' finished runs in the same output folder are reused.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quality_report import markdown_table, provenance, provenance_lines, write_results
from quality_runs import REPO, EvalSettings, RunSpec, epoch_budget, evaluate_run, load_shared_data, train_run

from freetickets_hub.artifact.files import atomic_path
from freetickets_hub.evaluation import create_accelerator

DST_RECIPE = "training/recipes/fmnist_wrn10_2_dst.yaml"
EDST_RECIPE = "training/recipes/fmnist_wrn10_2_edst.yaml"
SEED = 0  # members of dense/DST/static ensembles use seeds 0, 1, 2; EDST is one run with seed 0
NUM_MEMBERS = 3
SPARSITY = 0.8
FLOPS_TARGET = 0.65
SMOKE_NOTE = " (SMOKE: a plumbing check; its numbers say nothing about the method)"
QUALITY_HEADER = ["method", "acc", "acc (T)", "NLL", "NLL (T)", "ECE", "ECE (T)", "Brier", "Brier (T)", "T"]
ROBUSTNESS_HEADER = [
    "method",
    "AUROC H",
    "AUROC MI",
    "AUROC H shifted",
    "AUROC H far",
    "corr. acc",
    "corr. NLL",
    "disagree",
    "member acc",
    "member NLL (T)",
]
COSTS_HEADER = ["method", "train FLOPs", "x dense", "wall s", "x dense", "inference FLOPs", "nonzero params", "bytes"]


@dataclass
class Preset:
    """How big a benchmark is; everything else comes from the two Fashion-MNIST recipes."""

    epochs: int  # E: epochs of one dense/DST member (a multiple of 5)
    train_images: int | None  # cap on training images after the validation carve (None: all 54,946)
    val_size: int  # validation carve (temperature fits)
    test_images: int | None  # first N test images (None: all 10,000)
    update_interval: int  # ΔT in steps
    corruption_images: int  # first N test images, 9 corruptions x 5 severities
    architecture: str = "cifar_wrn10_2"
    mixed_precision: str = "no"
    checkpoint_every: int | None = None
    eval_batch_size: int = 500
    batch_size: int = 128
    lr: float = 0.1  # scaled linearly with the batch size


PRESETS = {
    # 8 steps per epoch: checks the plumbing, not the method (~470 training steps in all)
    "smoke": Preset(5, 1024, 1000, 1000, update_interval=4, corruption_images=100),
    # 312 steps per epoch, ΔT as in the recipes (about 0.6 epoch); ~18,400 steps in all (~65 min at 0.21 s),
    # then ~9 min of evaluation (5,000 val + 10,000 test + 1,797 digits + 45 x 500 corrupted images per member)
    "full": Preset(5, 40_000, 5000, None, update_interval=200, corruption_images=500, checkpoint_every=500),
    # the paper's regime on a lent GPU: a wide, over-parameterised WRN trained longer, in bf16
    # (not yet timed: estimated ~5-6 min of training: 25,300 steps of ~1.8 dense TFLOPs each, plus start-ups and
    # evaluation; batch 256 at LR 0.2 halves the per-step overhead; ΔT=100 keeps about half an epoch)
    "gpu": Preset(
        10, None, 5000, None, 100, 1000, "cifar_wrn16_8", "bf16", eval_batch_size=1000, batch_size=256, lr=0.2
    ),
}


def build_specs(preset: Preset, dataset: str, extra: list[str], edst_extra: Sequence[str] = ()) -> list[RunSpec]:
    """The five runs of a preset; ``extra`` (``--set``) overrides apply to all of them, ``edst_extra`` to EDST, last."""
    t_ex, t_re = epoch_budget(preset.epochs)
    common = [
        f"dataset={dataset}",
        f"architecture={preset.architecture}",
        f"seed={SEED}",
        f"val_size={preset.val_size}",
        f"max_train_samples={_yaml(preset.train_images)}",
        f"max_test_samples={_yaml(preset.test_images)}",
        f"sparsity={SPARSITY}",
        f"update_interval={preset.update_interval}",
        f"lr={preset.lr}",
        f"batch_size={preset.batch_size}",
        "ticket_selection=last",  # no method picks its members with the validation split
        f"mixed_precision={preset.mixed_precision!r}",  # quoted: YAML reads a bare no as false
        f"checkpoint_every={_yaml(preset.checkpoint_every)}",
        f"eval_batch_size={preset.eval_batch_size}",
    ]
    dense_like = [f"epochs={preset.epochs}", "lr_milestones=[0.6, 0.8]"]
    ensemble = [f"num_members={NUM_MEMBERS}"]
    edst = [f"explore_epochs={t_ex}", f"refine_epochs={t_re}", "refine_lrs=[0.01, 0.001]", "escape_rate=0.8"]
    runs = [
        ("single_dense", "single dense", DST_RECIPE, [*dense_like, "method=dense", "num_members=1"]),
        ("dense_ensemble", "dense ensemble", DST_RECIPE, [*dense_like, *ensemble, "method=dense_ensemble"]),
        ("dst_ensemble", "DST ensemble", DST_RECIPE, [*dense_like, *ensemble, "method=dst"]),
        ("edst_ensemble", "EDST ensemble", EDST_RECIPE, [*edst, *ensemble, "method=edst"]),
        (
            "static_sparse_ensemble",
            "static sparse ensemble",
            DST_RECIPE,
            [*dense_like, *ensemble, "method=static_sparse"],
        ),
    ]
    return [
        RunSpec(name, label, recipe, [*common, *own, *extra, *(edst_extra if name == "edst_ensemble" else ())])
        for name, label, recipe, own in runs
    ]


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value)


def collect(spec: RunSpec, summary: dict[str, Any], evaluation: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One method's row: the numbers of the tables, plus where they came from."""
    recipe, costs = summary["recipe"], summary["costs"]
    unc, cal = evaluation["test"]["uncalibrated"], evaluation["test"]["calibrated"]
    ood, corruptions = evaluation.get("ood"), evaluation.get("corruptions")
    edst = recipe["method"] == "edst"
    return {
        "label": spec.label,
        "method": recipe["method"],
        "num_members": evaluation["num_members"],
        "seeds": [recipe["seed"]] if edst else [recipe["seed"] + i for i in range(recipe["num_members"])],
        "epochs": (
            {"explore": recipe["explore_epochs"], "refine": recipe["refine_epochs"], "members": recipe["num_members"]}
            if edst
            else {"per_member": recipe["epochs"], "members": recipe["num_members"]}
        ),
        "total_steps": summary["total_steps"],
        "num_images": summary["num_images"],
        **{k: unc[k] for k in ("accuracy", "nll", "ece", "brier")},
        **{f"{k}_calibrated": cal[k] for k in ("accuracy", "nll", "ece", "brier")},
        "temperature": evaluation["temperature"],
        "mean_member_accuracy": evaluation["mean_member"]["uncalibrated"]["accuracy"],
        "mean_member_nll_calibrated": evaluation["mean_member"]["calibrated"]["nll"],
        "ood_auroc_entropy": ood["entropy"]["auroc"] if ood else None,
        "ood_auroc_mutual_information": (ood["mutual_information"] or {}).get("auroc") if ood else None,
        "ood_auroc_entropy_shifted": ood["kinds"]["shifted"]["entropy"] if ood else None,
        "ood_auroc_entropy_far": ood["kinds"]["far"]["entropy"] if ood else None,
        "corruption_accuracy": corruptions["accuracy"] if corruptions else None,
        "corruption_nll": corruptions["nll"] if corruptions else None,
        "disagreement": evaluation["diversity"]["disagreement"],
        "training_flops": costs["training_flops"],
        "wall_time_s": summary["benchmark_wall_time_s"],
        "inference_flops": costs["inference_flops_ensemble"],
        "params_nonzero": sum(costs["params_nonzero_per_member"]),
        "artifact_bytes": (folder / "model.safetensors").stat().st_size,
        "evaluation": evaluation,
    }


def add_relative_costs(rows: dict[str, dict[str, Any]]) -> None:
    base = rows["single_dense"]
    for row in rows.values():
        row["training_flops_vs_single_dense"] = row["training_flops"] / base["training_flops"]
        row["wall_time_vs_single_dense"] = row["wall_time_s"] / base["wall_time_s"]


def check_targets(rows: dict[str, dict[str, Any]], preset_name: str) -> list[dict[str, Any]]:
    """The issue's targets, each with its numbers and PASS (True) or MISS (False)."""
    edst, dst, dense = rows["edst_ensemble"], rows["dst_ensemble"], rows["single_dense"]
    flops_vs_dst = edst["training_flops"] / dst["training_flops"]
    targets = [
        {
            "target": f"EDST training FLOPs <= {FLOPS_TARGET}x single dense",
            "numbers": f"{edst['training_flops_vs_single_dense']:.3f}x",
            "pass": edst["training_flops_vs_single_dense"] <= FLOPS_TARGET,
        },
        {
            "target": f"EDST accuracy >= DST ensemble's at <= {FLOPS_TARGET}x its FLOPs",
            "numbers": f"{100 * edst['accuracy']:.2f}% vs {100 * dst['accuracy']:.2f}% at {flops_vs_dst:.3f}x",
            "pass": edst["accuracy"] >= dst["accuracy"] and flops_vs_dst <= FLOPS_TARGET,
        },
    ]
    for row in rows.values():
        if row["num_members"] > 1:
            targets.append(
                {
                    "target": f"{row['label']}: calibrated NLL below its mean member's (each member calibrated)",
                    "numbers": f"{row['nll_calibrated']:.4f} vs {row['mean_member_nll_calibrated']:.4f}",
                    "pass": row["nll_calibrated"] < row["mean_member_nll_calibrated"],
                }
            )
    targets.append(
        {
            "target": "EDST within 0.5 accuracy points of single dense, calibrated NLL no worse",
            "numbers": f"{100 * edst['accuracy']:.2f}% vs {100 * dense['accuracy']:.2f}%; "
            f"NLL {edst['nll_calibrated']:.4f} vs {dense['nll_calibrated']:.4f}",
            "pass": edst["accuracy"] >= dense["accuracy"] - 0.005 and edst["nll_calibrated"] <= dense["nll_calibrated"],
        }
    )
    if preset_name == "gpu":  # the paper's claims, on its own (uncalibrated) terms
        ensemble = rows["dense_ensemble"]
        targets += [
            {
                "target": "paper: EDST >= single dense in accuracy, with lower NLL and ECE (uncalibrated)",
                "numbers": f"{100 * edst['accuracy']:.2f}% vs {100 * dense['accuracy']:.2f}%; NLL {edst['nll']:.4f} "
                f"vs {dense['nll']:.4f}; ECE {edst['ece']:.4f} vs {dense['ece']:.4f}",
                "pass": edst["accuracy"] >= dense["accuracy"]
                and edst["nll"] < dense["nll"]
                and edst["ece"] < dense["ece"],
            },
            {
                "target": "paper: EDST within 0.5 points of the dense ensemble",
                "numbers": f"{100 * edst['accuracy']:.2f}% vs {100 * ensemble['accuracy']:.2f}%",
                "pass": edst["accuracy"] >= ensemble["accuracy"] - 0.005,
            },
        ]
    return targets


def render_markdown(results: dict[str, Any]) -> str:
    rows, preset = results["methods"], results["preset"]
    settings = results["settings"]
    edst_epochs = settings["t_ex"] + NUM_MEMBERS * settings["t_re"]
    calibration_keys = ("nll", "nll_calibrated", "ece", "ece_calibrated", "brier", "brier_calibrated", "temperature")
    quality = [
        [r["label"], _percent(r["accuracy"]), _percent(r["accuracy_calibrated"]), *(r[k] for k in calibration_keys)]
        for r in rows.values()
    ]
    robustness = [
        [r["label"], r["ood_auroc_entropy"], r["ood_auroc_mutual_information"],
         r["ood_auroc_entropy_shifted"], r["ood_auroc_entropy_far"],
         _percent(r["corruption_accuracy"]), r["corruption_nll"], r["disagreement"],
         _percent(r["mean_member_accuracy"]), r["mean_member_nll_calibrated"]]
        for r in rows.values()
    ]  # fmt: skip
    costs = [
        [r["label"], f"{r['training_flops']:.3e}", f"{r['training_flops_vs_single_dense']:.3f}",
         f"{r['wall_time_s']:.0f}", f"{r['wall_time_vs_single_dense']:.2f}", f"{r['inference_flops']:.3e}",
         f"{r['params_nonzero']:,}", f"{r['artifact_bytes']:,}"]
        for r in rows.values()
    ]  # fmt: skip
    data = results["data"]
    lines = [
        f"### Preset `{preset}`" + (SMOKE_NOTE if preset == "smoke" else ""),
        "",
        *provenance_lines(results["provenance"], results["wall_time_s"], sum(r["wall_time_s"] for r in rows.values())),
        f"- data: Fashion-MNIST, {data['train']} training images, validation carve {data['val']} (seed {SEED}, "
        f"used for temperatures), {data['test']} test images; OOD: scikit-learn digits, all 1,797, resized to 28x28",
        f"- {settings['architecture']}, S={SPARSITY} (ERK), ΔT={settings['update_interval']} steps, "
        f"batch {settings['batch_size']}, LR {settings['lr']}, "
        f"E={settings['epochs']} epochs per dense/DST/static member; EDST t_ex={settings['t_ex']} + "
        f"{NUM_MEMBERS} x t_re={settings['t_re']} = {edst_epochs} epochs ({edst_epochs / settings['epochs']:.1f}E)"
        + (f", EDST overrides {settings['edst_overrides']}" if settings["edst_overrides"] else "")
        + f"; seeds {SEED}, {SEED + 1}, {SEED + 2} for the members of M-run ensembles, {SEED} for EDST",
        "",
        "Test accuracy (%) and calibration, before / after one temperature fitted on the validation carve:",
        "",
        markdown_table(QUALITY_HEADER, quality),
        "",
        "OOD AUROC vs digits (score: -entropy, -mutual information); entropy AUROC averaged over the shifted "
        "suite (9 corruptions at severity 5, inverted, rotated 90°: 500 test images each) and the far suite "
        "(digits, Gaussian / uniform noise, constant images; `benchmarks/ood.py` has seeds and intervals); "
        f"mean over {len(results['corruptions'])} "
        f"corruptions x 5 severities on the first {settings['corruption_images']} test images (calibrated), "
        "pairwise member disagreement, and the mean member (accuracy; NLL with its own temperature):",
        "",
        markdown_table(ROBUSTNESS_HEADER, robustness),
        "",
        "Costs (training FLOPs by the RigL convention; wall time of the training process, under whatever load "
        "the machine had):",
        "",
        markdown_table(COSTS_HEADER, costs),
        "",
        "Targets:",
        "",
        *(f"- **{'PASS' if t['pass'] else 'MISS'}** {t['target']}: {t['numbers']}" for t in results["targets"]),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


def write_plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy and NLL (filled: calibrated, hollow: uncalibrated) against training FLOPs, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2), dpi=120, layout="constrained")
    acc_ax, nll_ax = figure.subplots(1, 2)
    for index, row in enumerate(rows.values()):
        color, flops = f"C{index}", row["training_flops_vs_single_dense"]
        acc_ax.scatter(flops, 100 * row["accuracy"], color=color, label=row["label"], zorder=3)
        nll_ax.scatter(flops, row["nll_calibrated"], color=color, label=row["label"], zorder=3)
        nll_ax.scatter(flops, row["nll"], facecolors="none", edgecolors=color, zorder=3)
        nll_ax.plot([flops, flops], [row["nll"], row["nll_calibrated"]], color=color, linewidth=0.8)
    dense_flops = rows["single_dense"]["training_flops"]
    xlabel = f"training FLOPs (x single dense = {dense_flops:.2e})"
    acc_ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title="Accuracy vs training cost")
    nll_ax.set(xlabel=xlabel, ylabel="test NLL", title="NLL (filled: temperature-scaled, hollow: raw)")
    for ax in (acc_ax, nll_ax):
        ax.axvline(FLOPS_TARGET, color="gray", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--output-dir", default=None, help="default: runs/quality-<preset>")
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "fashion_mnist"))
    parser.add_argument("--epochs", type=int, default=None, help="override E (a multiple of 5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    parser.add_argument(
        "--edst-set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for the EDST run only"
    )
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to leave it alone")
    args = parser.parse_args()
    started = time.time()
    info = provenance(started)
    preset = PRESETS[args.preset]
    if args.epochs is not None:
        preset.epochs = args.epochs
    out = Path(args.output_dir or REPO / "runs" / f"quality-{args.preset}")
    specs = build_specs(preset, args.dataset, args.set, args.edst_set)
    summaries = {spec.name: train_run(spec, out / spec.name) for spec in specs}
    data = load_shared_data(specs)
    accelerator = create_accelerator()
    settings = EvalSettings(ood=True, corruption_images=preset.corruption_images, batch_size=preset.eval_batch_size)
    rows = {
        spec.name: collect(
            spec, summaries[spec.name], evaluate_run(out / spec.name, data, settings, accelerator), out / spec.name
        )
        for spec in specs
    }
    add_relative_costs(rows)
    t_ex, t_re = (rows["edst_ensemble"]["epochs"][k] for k in ("explore", "refine"))
    first_eval = next(iter(rows.values()))["evaluation"]
    results = {
        "preset": args.preset,
        "settings": {
            **asdict(preset),
            "t_ex": t_ex,
            "t_re": t_re,
            "seed": SEED,
            "extra_overrides": args.set,
            "edst_overrides": args.edst_set,
        },
        "data": {"train": len(data.train), "val": len(data.val or []), "test": len(data.test)},
        "corruptions": first_eval.get("corruptions", {}).get("names", []),
        "provenance": info,
        "methods": rows,
        "targets": check_targets(rows, args.preset),
        "wall_time_s": round(time.time() - started, 1),
    }
    markdown = render_markdown(results)
    write_plot(rows, out / "quality.png")
    written = write_results(out, results, markdown, args.results_md, f"quality-{args.preset}")
    print(markdown)
    print("wrote " + ", ".join([str(out / "quality.png"), *written]))


if __name__ == "__main__":
    main()
