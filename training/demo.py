"""Show a trained ensemble: members vs ensemble on the test split, then predictions with uncertainty.

``python -m freetickets_hub.training.demo runs/demo`` (the second half of ``make demo``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import load_dataset

from freetickets_hub.cli import format_summary_table
from freetickets_hub.ensemble import EnsembleModel
from freetickets_hub.model_card import SUMMARY_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by `freetickets train`")
    parser.add_argument("--num-images", type=int, default=8)
    args = parser.parse_args()
    folder = Path(args.folder)
    summary = json.loads((folder / SUMMARY_NAME).read_text())
    print(f"\n{summary['test_split_description']} (ECE: {summary['ece_bins']} equal-width bins)")
    print(format_summary_table(summary))

    model = EnsembleModel.from_pretrained(folder)
    recipe = summary["recipe"]
    test = load_dataset(recipe["dataset"], recipe["dataset_config"], split=recipe["test_split"])
    sample = test.select(range(args.num_images))
    label_col = next(k for k, v in test.features.items() if hasattr(v, "names"))
    image_col = next(k for k in test.features if k != label_col)
    predictions = model.predict([row[image_col] for row in sample])
    names = test.features[label_col].names
    print(f"\nReloaded {folder} with EnsembleModel.from_pretrained; predictions on {args.num_images} test images:")
    print(f"{'true':<12} {'predicted':<12} {'conf':>6} {'entropy':>8} {'MI':>8} {'disagree':>9}")
    for row, pred in zip(sample, predictions.to_records(), strict=True):
        print(
            f"{names[row[label_col]]:<12} {pred['label']:<12} {pred['confidence']:>6.3f} {pred['entropy']:>8.4f} "
            f"{pred['mutual_information']:>8.4f} {pred['disagreement']:>9.2f}"
        )


if __name__ == "__main__":
    main()
