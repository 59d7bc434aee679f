"""Show a trained ensemble: calibrate it on the run's own validation carve, members vs ensemble on
the test split, and its uncertainty on out-of-distribution images next to in-distribution ones.

``python -m freetickets_hub.training.demo runs/demo`` (the second half of ``make demo``). The fitted
temperature is stored in the folder (``config.json`` and the model card), as ``freetickets calibrate``
does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.artifact.names import CONFIG_NAME, README_NAME, SUMMARY_NAME
from freetickets_hub.data import resolve_dataset, run_validation_rows
from freetickets_hub.evaluation import EvalSplit, create_accelerator, load_eval_split, run_inference
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.calibration import fit_temperature
from freetickets_hub.uncertainty.metrics import classification_metrics, detection_metrics
from freetickets_hub.uncertainty.outputs import combine_member_logits

OOD_SOURCE = "sklearn:digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by `freetickets train` (with a validation carve)")
    parser.add_argument("--num-images", type=int, default=4, help="images of each kind to show (default: 4)")
    args = parser.parse_args()
    folder = Path(args.folder)
    summary = json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
    recipe = summary["recipe"]
    if not recipe.get("val_size"):
        raise SystemExit(f"{folder} was trained without a validation carve (val_size 0): nothing to calibrate on")
    model = EnsembleModel.from_pretrained(folder)
    source = resolve_dataset(recipe["dataset"])
    rows = run_validation_rows(recipe, source)
    load = dict(dataset_config=recipe["dataset_config"])
    val = load_eval_split(source, model.config, split=recipe["train_split"], rows=rows, **load)
    cap = recipe.get("max_test_samples")  # the trainer's test split: its first `cap` images
    test_split = f"{recipe['test_split']}[:{cap}]" if cap else recipe["test_split"]
    test = load_eval_split(source, model.config, split=test_split, **load)
    ood = load_eval_split(OOD_SOURCE, model.config, require_labels=False)
    accelerator = create_accelerator()
    logits = {
        name: run_inference(model, split.images, accelerator, batch_size=500, desc=name).member_logits
        for name, split in (("validation", val), ("test", test), ("ood", ood))
    }

    # one temperature for the ensemble, and one per member so the mean member is calibrated as fairly
    fit = fit_temperature(logits["validation"], val.labels)
    member_t = [fit_temperature(m[None], val.labels).temperature for m in logits["validation"]]
    print(
        f"\nTemperature fitted on the run's own validation carve ({len(val)} images held out of "
        f"{recipe['train_split']!r}, seed {recipe['seed']}): T = {fit.temperature:.4f}; "
        f"validation NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}, ECE {fit.ece_before:.4f} -> {fit.ece_after:.4f}"
    )
    print(f"\nTest split, {len(test)} images (ECE: 15 equal-width bins); (T) = with the fitted temperature")
    print(f"{'model':<12} {'T':>6} {'accuracy':>9} {'NLL':>8} {'NLL (T)':>8} {'ECE':>8} {'ECE (T)':>8}")
    rows_out = []
    for index, member in enumerate(logits["test"]):
        before = classification_metrics(torch.softmax(member, -1), test.labels)
        after = classification_metrics(torch.softmax(member / member_t[index], -1), test.labels)
        rows_out.append((f"member {index}", member_t[index], before, after))
    mean = {
        key: {k: sum(r[i][k] for r in rows_out) / len(rows_out) for k in ("accuracy", "nll", "ece")}
        for i, key in ((2, "before"), (3, "after"))
    }
    rows_out.append(("mean member", sum(member_t) / len(member_t), mean["before"], mean["after"]))
    before = classification_metrics(combine_member_logits(logits["test"], 1.0).probs, test.labels)
    after = classification_metrics(combine_member_logits(logits["test"], fit.temperature).probs, test.labels)
    rows_out.append(("ensemble", fit.temperature, before, after))
    for name, t, b, a in rows_out:
        print(
            f"{name:<12} {t:>6.3f} {a['accuracy']:>9.4f} {b['nll']:>8.4f} {a['nll']:>8.4f} "
            f"{b['ece']:>8.4f} {a['ece']:>8.4f}"
        )
    gain = mean["after"]["nll"] - after["nll"]
    verdict = "beats" if gain > 0 else "does NOT beat"
    print(
        f"calibrated NLL: the ensemble ({after['nll']:.4f}) {verdict} its mean member ({mean['after']['nll']:.4f}) "
        f"by {gain:+.4f}; accuracy {after['accuracy'] - mean['after']['accuracy']:+.4f}"
    )

    if fit.degenerate:  # as `freetickets calibrate`: reported, not stored
        print(f"degenerate fit, temperature not stored: {fit.reason}")
    else:
        model.set_temperature(
            fit.temperature,
            fit_on=f"{Path(source).name}: the run's validation carve ({len(val)} images of {recipe['train_split']!r})",
        )
        write_text_atomic(folder / CONFIG_NAME, model.config.to_json())
        write_text_atomic(folder / README_NAME, str(model.generate_model_card(save_directory=folder)))
        print(f"stored T = {fit.temperature:.4f} in {folder / CONFIG_NAME} and the model card")
    _show_uncertainty(model, test, ood, logits, model.temperature, args.num_images)


def _show_uncertainty(
    model: EnsembleModel,
    test: EvalSplit,
    ood: EvalSplit,
    logits: dict[str, torch.Tensor],
    temperature: float,
    count: int,
) -> None:
    """A few test and digit images side by side, then how well the uncertainty separates all of them."""
    names = model.config.label_names
    picks = [("fashion", i, test) for i in range(count)] + [("digits (OOD)", i, ood) for i in range(count)]
    images = [split.images[i, 0].numpy() for _, i, split in picks]  # uint8 (H, W) at the model's size
    predictions = model.predict(images).to_records()
    print(
        f"\nReloaded {model.source_dir}; predictions (temperature {model.temperature:.3f}) on {count} test images "
        f"and {count} {OOD_SOURCE} images, which no member has seen anything like:"
    )
    print(f"{'source':<13} {'true':<12} {'predicted':<12} {'conf':>6} {'entropy':>8} {'MI':>8} {'disagree':>9}")
    for (kind, i, split), pred in zip(picks, predictions, strict=True):
        true = names[int(split.labels[i])] if split.labels is not None else "-"
        print(
            f"{kind:<13} {true:<12} {pred['label']:<12} {pred['confidence']:>6.3f} {pred['entropy']:>8.4f} "
            f"{pred['mutual_information']:>8.4f} {pred['disagreement']:>9.2f}"
        )
    inside = combine_member_logits(logits["test"], temperature)
    outside = combine_member_logits(logits["ood"], temperature)
    print(f"\nTelling all {len(ood)} digits from all {len(test)} test images (AUROC, 1.0 = perfect, 0.5 = chance):")
    for label, key in (("entropy (total)", "entropy"), ("mutual information (epistemic)", "mutual_information")):
        auroc = detection_metrics(-getattr(inside, key), -getattr(outside, key))["auroc"]
        mean_in, mean_out = getattr(inside, key).mean().item(), getattr(outside, key).mean().item()
        print(f"  {label:<31} AUROC {auroc:.4f}; mean {mean_in:.4f} on test vs {mean_out:.4f} on digits")


if __name__ == "__main__":
    main()
