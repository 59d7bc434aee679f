"""Out-of-distribution evidence: an OOD suite, three seeds per method, bootstrap intervals, diagnostics, levers.

Every run trains WRN-10-2 on Fashion-MNIST **without two classes** (Shirt, Sneaker: one top, one shoe),
so their images are a near-OOD set; the same runs are scored on far-OOD sets (scikit-learn digits,
Gaussian / uniform noise, constant images) and shifted sets (the 9 corruptions at severity 5, inverted
and 90°-rotated test images), with AUROC, AUPR and FPR@95 for max probability, entropy and mutual
information, before and after temperature scaling (fitted on the validation carve).

Methods: single dense, dense ensemble (M=3), DST ensemble (M=3, S=0.8), EDST ensemble (M=3, S=0.8,
t_ex = 0.6·E, t_re = 0.4·E), each with seeds 0, 1, 2 (ensemble members use seed·10 + i). Levers of the
method (seed 0, EDST at the same epochs): escape rate, refinement LR reset, exploration length,
sparsity, uniform vs ERK. Levers are ranked on a *validation* OOD suite built from the validation
carve and the held-out classes' training images, never on the test-time sets.

    python benchmarks/ood.py                  # train what is missing, evaluate, report (~75 min, idle 2-core CPU)
    python benchmarks/ood.py --stage train    # only train

Runs go to ``runs/ood-cpu/<name>`` (resumable per run, see ``quality_runs.train_run``); member logits on
every set are cached per run in ``ood_logits.safetensors``; ``results.json`` and ``results.md`` land in
the output folder and the tables in ``benchmarks/RESULTS.md`` (section ``ood-cpu``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from quality_runs import REPO, RunSpec, epoch_budget, train_run

DST_RECIPE = "training/recipes/fmnist_wrn10_2_dst.yaml"
EDST_RECIPE = "training/recipes/fmnist_wrn10_2_edst.yaml"
HELD_OUT = ("Shirt", "Sneaker")
SEEDS = (0, 1, 2)
NUM_MEMBERS = 3
SPARSITY = 0.8


@dataclass(frozen=True)
class Preset:
    """How big the benchmark is (everything else comes from the two Fashion-MNIST recipes)."""

    epochs: int = 5  # E of one dense/DST member; EDST trains 1.8·E
    train_images: int = 8000  # after the validation carve
    val_size: int = 2000
    update_interval: int = 40  # ΔT, about 0.6 epoch as in the recipes
    batch_size: int = 128
    lr: float = 0.1


PRESET = Preset()
METHODS = {  # name -> (label, recipe, overrides)
    "single_dense": ("single dense", DST_RECIPE, ["method=dense", "num_members=1"]),
    "dense_ensemble": ("dense ensemble", DST_RECIPE, ["method=dense_ensemble"]),
    "dst_ensemble": ("DST ensemble", DST_RECIPE, ["method=dst"]),
    "edst_ensemble": ("EDST ensemble", EDST_RECIPE, ["method=edst"]),
}
LEVERS = {  # EDST at seed 0, one change each; the same epochs (training FLOPs change only with sparsity)
    "edst_q0.5": ("escape rate q=0.5 (default 0.8)", ["escape_rate=0.5"]),
    "edst_reset0.05": ("refinement LR reset to 0.05 (default 0.01)", ["refine_lrs=[0.05, 0.01, 0.001]"]),
    "edst_explore6": ("exploration 6 + 3 x 1 epochs (default 3 + 3 x 2)", ["explore_epochs=6", "refine_epochs=1"]),
    "edst_s0.5": ("sparsity 0.5 (default 0.8)", ["sparsity=0.5"]),
    "edst_uniform": ("uniform layer densities (default ERK)", ["distribution=uniform"]),
}


def build_specs(preset: Preset, dataset: str) -> list[RunSpec]:
    """The seeded method runs (seed-major) and then the lever runs."""
    t_ex, t_re = epoch_budget(preset.epochs)
    held_out = ", ".join(HELD_OUT)
    common = [
        f"dataset={dataset}",
        f"exclude_classes=[{held_out}]",
        f"val_size={preset.val_size}",
        f"max_train_samples={preset.train_images}",
        f"sparsity={SPARSITY}",
        f"update_interval={preset.update_interval}",
        f"lr={preset.lr}",
        f"batch_size={preset.batch_size}",
        "ticket_selection=last",
        "checkpoint_every=null",
    ]
    schedule = {
        "dense_like": [f"epochs={preset.epochs}", "lr_milestones=[0.6, 0.8]"],
        "edst": [f"explore_epochs={t_ex}", f"refine_epochs={t_re}", "refine_lrs=[0.01, 0.001]", "escape_rate=0.8"],
    }
    specs = []
    for seed in SEEDS:
        for name, (label, recipe, own) in METHODS.items():
            members = [] if name == "single_dense" else [f"num_members={NUM_MEMBERS}"]
            # the carve is seeded by the recipe seed; member i of an ensemble trains with seed + i
            seeding = [f"seed={10 * seed}"]
            plan = schedule["edst" if name.startswith("edst") else "dense_like"]
            specs.append(
                RunSpec(f"{name}_s{seed}", f"{label} (seed {seed})", recipe, [*common, *seeding, *plan, *members, *own])
            )
    for name, (label, own) in LEVERS.items():
        overrides = [*common, "seed=0", *schedule["edst"], f"num_members={NUM_MEMBERS}", "method=edst", *own]
        specs.append(RunSpec(name, label, EDST_RECIPE, overrides))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "ood-cpu"))
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "fashion_mnist"))
    parser.add_argument("--stage", choices=("train", "all"), default="all")
    args = parser.parse_args()
    out = Path(args.output_dir)
    specs = build_specs(PRESET, args.dataset)
    for spec in specs:
        train_run(spec, out / spec.name)
    if args.stage == "train":
        return


if __name__ == "__main__":
    main()
