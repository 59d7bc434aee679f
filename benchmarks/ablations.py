"""Ablations the paper leaves open: how much member diversity each FreeTickets knob buys.

Smoke-sized runs of WRN-10-2 on Fashion-MNIST (3,200 training images, 25 steps per epoch), each in
its own process and folder (resumable like ``quality.py``), about a minute each on an idle 2-core CPU:

- EDST escape rate q in {0.1, 0.5, 0.8};
- EDST prune rate p in {0.3, 0.5, 0.7};
- EDST update interval ΔT at ½×, 1× and 2× the recipes' (ΔT=200 at 430 steps per epoch, about half an
  epoch; here 12 steps of 25);
- DST ensemble vs dense ensemble, whose members differ by their random seeds only.

The EDST baseline (q=0.8, p=0.5, 1× ΔT) is shared by the three EDST groups. EDST trains 3 + 3 × 2 =
9 epochs, the DST and dense ensembles 3 × 5 epochs. Each row reports ensemble accuracy and NLL next to
member diversity on the test images: pairwise KL, top-1 disagreement (both at the temperature fitted
on the validation carve) and the Jaccard distance between members' masks.

    python benchmarks/ablations.py [--output-dir runs/ablations]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from quality_report import markdown_table, provenance, provenance_lines, write_results
from quality_runs import REPO, EvalSettings, RunSpec, epoch_budget, evaluate_run, load_shared_data, train_run

from freetickets_hub.evaluation import create_accelerator

EDST_RECIPE = "training/recipes/fmnist_wrn10_2_edst.yaml"
DST_RECIPE = "training/recipes/fmnist_wrn10_2_dst.yaml"
EPOCHS = 5  # E of a DST/dense member; EDST gets t_ex = 3, t_re = 2
TRAIN_IMAGES = 3200
UPDATE_INTERVAL = 12  # about half an epoch of 25 steps, as the recipes' 200 of 430
BASE = {"escape_rate": 0.8, "prune_rate": 0.5, "update_interval": UPDATE_INTERVAL}
GROUPS = {
    "escape rate q (EDST)": ("escape_rate", [0.1, 0.5, 0.8]),
    "prune rate p (EDST)": ("prune_rate", [0.3, 0.5, 0.7]),
    "update interval ΔT (EDST, steps)": ("update_interval", [n * UPDATE_INTERVAL // 2 for n in (1, 2, 4)]),
}
SHORT = {"escape_rate": "q", "prune_rate": "p", "update_interval": "dt"}  # run folder names
HEADER = [
    "setting",
    "ens. acc",
    "ens. NLL",
    "NLL (T)",
    "member acc",
    "pairwise KL",
    "disagree",
    "mask Jaccard",
    "train FLOPs",
]


def build_specs(dataset: str) -> tuple[list[RunSpec], dict[str, list[tuple[str, str]]]]:
    """All runs (the EDST baseline once), and for each group its (row label, run name) pairs."""
    t_ex, t_re = epoch_budget(EPOCHS)
    common = [
        f"dataset={dataset}",
        "seed=0",
        "val_size=1000",
        f"max_train_samples={TRAIN_IMAGES}",
        "max_test_samples=1000",
        "sparsity=0.8",
        "lr=0.1",
        "ticket_selection=last",
        "checkpoint_every=null",
        "num_members=3",
    ]
    edst = [*common, "method=edst", f"explore_epochs={t_ex}", f"refine_epochs={t_re}", "refine_lrs=[0.01, 0.001]"]
    specs: dict[str, RunSpec] = {}
    groups: dict[str, list[tuple[str, str]]] = {}
    for group, (key, values) in GROUPS.items():
        groups[group] = []
        for value in values:
            knobs = {**BASE, key: value}
            name = "edst_" + "_".join(f"{SHORT[k]}{v}" for k, v in knobs.items())
            specs[name] = RunSpec(name, name, EDST_RECIPE, [*edst, *(f"{k}={v}" for k, v in knobs.items())])
            groups[group].append((f"{key}={value}" + (" (baseline)" if knobs == BASE else ""), name))
    dense_like = [*common, f"epochs={EPOCHS}", "lr_milestones=[0.6, 0.8]"]
    dst = [*dense_like, "method=dst", *(f"{k}={v}" for k, v in BASE.items() if k != "escape_rate")]
    specs["dst_ensemble"] = RunSpec("dst_ensemble", "DST ensemble", DST_RECIPE, dst)
    specs["dense_ensemble"] = RunSpec(
        "dense_ensemble", "dense ensemble", DST_RECIPE, [*dense_like, "method=dense_ensemble"]
    )
    groups["DST ensemble vs dense ensemble (seeds 0, 1, 2)"] = [("DST", "dst_ensemble"), ("dense", "dense_ensemble")]
    return list(specs.values()), groups


def row(evaluation: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    test, diversity = evaluation["test"], evaluation["diversity"]
    return {
        "accuracy": test["uncalibrated"]["accuracy"],
        "nll": test["uncalibrated"]["nll"],
        "nll_calibrated": test["calibrated"]["nll"],
        "mean_member_accuracy": evaluation["mean_member"]["uncalibrated"]["accuracy"],
        "pairwise_kl": diversity["kl"],
        "disagreement": diversity["disagreement"],
        "mask_jaccard_distance": diversity["mask_jaccard"],
        "temperature": evaluation["temperature"],
        "training_flops": summary["costs"]["training_flops"],
        "wall_time_s": summary["benchmark_wall_time_s"],
        "recipe": summary["recipe"],
    }


def render_markdown(results: dict[str, Any]) -> str:
    lines = [
        "### Ablations (smoke-sized: trends at this size are weak evidence)",
        "",
        *provenance_lines(
            results["provenance"], results["wall_time_s"], sum(r["wall_time_s"] for r in results["runs"].values())
        ),
        f"- WRN-10-2, S=0.8 (ERK), M=3, {results['data']['train']} training images, validation carve "
        f"{results['data']['val']} (temperature), first {results['data']['test']} test images; EDST 3 + 3 x 2 epochs, "
        f"DST/dense 3 x {EPOCHS} epochs; baseline q=0.8, p=0.5, ΔT={UPDATE_INTERVAL}",
        "- diversity on the test images: pairwise KL (nats) and top-1 disagreement at the fitted temperature; "
        "mask Jaccard = 1 - |A∩B|/|A∪B| of the members' masks (n/a for dense members)",
    ]
    for group, entries in results["groups"].items():
        table = [
            [label, _percent(r["accuracy"]), r["nll"], r["nll_calibrated"], _percent(r["mean_member_accuracy"]),
             r["pairwise_kl"], r["disagreement"], r["mask_jaccard_distance"], f"{r['training_flops']:.3e}"]
            for label, r in ((label, results["runs"][name]) for label, name in entries)
        ]  # fmt: skip
        lines += ["", f"**{group}**", "", markdown_table(HEADER, table)]
    return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "ablations"))
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "fashion_mnist"))
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to leave it alone")
    args = parser.parse_args()
    started = time.time()
    info = provenance(started)
    out = Path(args.output_dir)
    specs, groups = build_specs(args.dataset)
    summaries = {spec.name: train_run(spec, out / spec.name) for spec in specs}
    data = load_shared_data(specs)
    accelerator = create_accelerator()
    settings = EvalSettings(ood=False, corruption_images=0)
    runs = {
        spec.name: row(evaluate_run(out / spec.name, data, settings, accelerator), summaries[spec.name])
        for spec in specs
    }
    results = {
        "provenance": info,
        "data": {"train": len(data.train), "val": len(data.val or []), "test": len(data.test)},
        "groups": groups,
        "runs": runs,
        "wall_time_s": round(time.time() - started, 1),
    }
    markdown = render_markdown(results)
    written = write_results(out, results, markdown, args.results_md, "ablations")
    print(markdown)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
