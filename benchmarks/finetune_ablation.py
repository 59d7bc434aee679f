"""Why fine-tuning underfits: one seeded base, one digit transfer, one recipe change per row.

Base: ``training/recipes/fmnist_tiny_edst.yaml`` (EDST M=3, S=0.8, WRN-10-2, 3,000 Fashion-MNIST images,
all ten classes). Target: scikit-learn digits (``finetune_data.write_digits``: 1,347 train, 200 of them the
validation carve, / 450 test, 8x8 resized to 28x28). Every row is ``training/recipes/finetune_small.yaml``
at the old LRs (``OLD_LRS``: the defaults this ablation explains) with the listed ``--set`` changes; each
run is cached in ``OUTPUT_DIR/<row>`` and skipped when done.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/finetune_ablation.py runs/ft_ablation
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from finetune_data import write_digits

from freetickets_hub.cli import main as cli

OLD_LRS = ["lr=0.05", "backbone_lr=0.01"]  # finetune_small.yaml before the sweep of benchmarks/finetune.py
ROWS = {  # row -> (extra finetune arguments, --set values)
    "crop": ([], []),
    "crop_backbone_lr_eq": ([], ["backbone_lr=0.05"]),
    "scratch": (["--from-scratch"], []),
    "old_default_flip": ([], ["augment=pad_crop_flip"]),
    "crop_lr_0.1_eq": ([], ["lr=0.1", "backbone_lr=0.1"]),
    "crop_no_warmup": ([], ["warmup_epochs=0"]),
    "dst": (["--mode", "dst"], []),
    "linear_probe": (["--mode", "linear-probe"], []),
    "crop_wd_1e-4": ([], ["weight_decay=1.0e-4"]),
}


def main(out: Path) -> None:
    base = out / "base"
    if not (base / "train_summary.json").is_file():
        assert (
            cli(
                [
                    "train",
                    "--recipe",
                    "training/recipes/fmnist_tiny_edst.yaml",
                    "--output-dir",
                    str(base),
                    "--overwrite",
                ]
            )
            == 0
        )
    digits = write_digits(out / "digits")
    for name, (extra, sets) in ROWS.items():
        folder = out / name
        if not (folder / "train_summary.json").is_file():
            start = time.time()
            args = ["finetune", str(base), "--dataset", str(digits), "--output-dir", str(folder), "--overwrite"]
            args += ["--recipe", "training/recipes/finetune_small.yaml", *extra]
            assert cli([*args, *(a for s in [*OLD_LRS, *sets] for a in ("--set", s))]) == 0, name
            print(f"{name}: {time.time() - start:.0f} s", flush=True)
        summary = json.loads((folder / "train_summary.json").read_text())
        test = summary["test"]["ensemble"]
        members = " ".join(f"{summary['test'][k]['accuracy']:.3f}" for k in summary["test"] if k.startswith("member_"))
        print(
            f"| {name} | {' '.join(sets + extra)} | {test['accuracy']:.4f} | {test['nll']:.4f} | {test['ece']:.4f} "
            f"| {members} |",
            flush=True,
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ft_ablation"))
