"""``freetickets calibrate``: the temperature and a selective rule, fitted on held-out data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from freetickets_hub.artifact.config import SelectiveConfig
from freetickets_hub.cli.options import OVERWRITE_HELP, probability
from freetickets_hub.errors import FreeTicketsError

__all__ = ["held_out_rows", "register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
    p = verbs.add_parser(
        "calibrate", help="fit the temperature (and a selective rule) on a held-out split; store them in config.json"
    )
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("--dataset", required=True, help="datasets source (Hub id or folder)")
    p.add_argument("--split", required=True, help="held-out split, slicing allowed: validation, 'train[:5000]'")
    p.add_argument("--dataset-config", default=None, help="datasets configuration name, if the source has several")
    p.add_argument("--max-samples", type=int, default=None, help="fit on a seeded random subset of N images")
    p.add_argument("--force", action="store_true", help="allow a split whose name contains 'test'")
    p.add_argument(
        "--output-dir", "--output", dest="output", default=None,
        help="save the calibrated ensemble here instead of updating MODEL (required for a Hub id)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    _add_selective_arguments(p)
    p.set_defaults(func=run)


# below this many held-out images one NLL-fitted temperature is noise: with 10 classes and ~90 % accuracy
# 200 images hold ~20 errors, and the fitted T then swings by tens of percent between resamples
MIN_RELIABLE_TEMPERATURE_IMAGES = 200


def run(args: argparse.Namespace) -> int:
    import os

    from freetickets_hub import EnsembleModel
    from freetickets_hub.artifact.files import check_writable, prepare_output_dir, write_text_atomic
    from freetickets_hub.artifact.names import CONFIG_NAME
    from freetickets_hub.data import public_dataset
    from freetickets_hub.errors import DatasetError
    from freetickets_hub.evaluation import create_accelerator, load_eval_split, run_inference
    from freetickets_hub.uncertainty.calibration import fit_temperature

    _resolve_selective_flags(args)
    if "test" in args.split.lower() and not args.force:
        raise DatasetError(
            f"refusing to fit on split {args.split!r}: it looks like a test split (fit on held-out data, "
            "e.g. --split validation or --split 'train[:5000]'; --force overrides)"
        )
    local = os.path.isdir(args.model)
    if not local and args.output is None:
        raise FreeTicketsError(
            f"{args.model!r} is not a local folder; pass --output-dir DIR to save the calibrated ensemble"
        )
    if args.output is not None and local and os.path.realpath(args.output) == os.path.realpath(args.model):
        args.output = None  # --output-dir MODEL is the in-place update
    if args.output is None:
        check_writable(args.model)
    else:
        prepare_output_dir(args.output, overwrite=args.overwrite)
    model = EnsembleModel.from_pretrained(args.model)
    split, rows = held_out_rows(args.model, args.dataset, args.split, args.dataset_config)
    data = load_eval_split(
        args.dataset,
        model.config,
        split=split,
        dataset_config=args.dataset_config,
        max_samples=args.max_samples,
        rows=rows,
    )
    accelerator = create_accelerator()
    logits = run_inference(model, data.images, accelerator, batch_size=args.batch_size, desc="calibrate").member_logits
    temperature_rows, selective_rows = _calibration_rows(args, len(data))
    if not accelerator.is_main_process:
        return 0
    if not args.keep_temperature:
        labels = data.labels[temperature_rows]
        fit = fit_temperature(logits[:, temperature_rows], labels, previous_temperature=model.temperature)
        fitted_on = f"{data.description}" if selective_rows is None else f"{len(labels)} of {data.description}"
        print(f"temperature {fit.previous_temperature:.4f} -> {fit.temperature:.4f} fitted on {fitted_on}")
        print(f"{'':<7} {'NLL':>8} {'ECE':>8}")
        print(f"{'before':<7} {fit.nll_before:>8.4f} {fit.ece_before:>8.4f}")
        print(f"{'after':<7} {fit.nll_after:>8.4f} {fit.ece_after:>8.4f}")
        if fit.degenerate:
            message = f"degenerate fit, temperature not stored: {fit.reason}"
            print(f"freetickets calibrate: error: {message}", file=sys.stderr)
            return 3
        count = f"{len(data)} images" if selective_rows is None else f"{len(labels)} of {len(data)} images"
        if len(labels) < MIN_RELIABLE_TEMPERATURE_IMAGES:
            print(
                f"freetickets calibrate: warning: the temperature was fitted on {len(labels)} images, fewer than "
                f"{MIN_RELIABLE_TEMPERATURE_IMAGES}: it is unreliable (fit on a larger held-out split)",
                file=sys.stderr,
            )
        model.set_temperature(fit.temperature, fit_on=f"{public_dataset(args.dataset)}:{args.split} ({count})")
    try:
        model.config.ensemble.selective = _fit_selective(args, model, logits, data.labels, selective_rows, len(data))
    except ValueError as err:  # no threshold meets the target risk, or too few images for the conformal alpha
        print(f"freetickets calibrate: error: nothing stored: {err}", file=sys.stderr)
        return 3
    if args.output is None:  # the weights stay as they are: only config.json and the card change
        write_text_atomic(os.path.join(args.model, CONFIG_NAME), model.config.to_json())
        card = model.generate_model_card(save_directory=Path(args.model))
        write_text_atomic(os.path.join(args.model, "README.md"), str(card))
        print(f"wrote {os.path.join(args.model, CONFIG_NAME)} and the model card")
        if not args.keep_temperature and os.path.isfile(os.path.join(args.model, "onnx", "model.onnx")):
            print(
                f"note: {args.model}/onnx/model.onnx still has the old temperature; "
                f"re-run `freetickets export onnx {args.model}` (OnnxEnsemble refuses the stale graph)"
            )
    else:
        model.save_pretrained(args.output)
        print(f"wrote {args.output}")
    return 0


_SELECTIVE_DEFAULTS = {  # flag -> (its default, the flag asking for the fit it tunes, what that fit is)
    "score": ("confidence", "target_risk", "abstention threshold"),
    "delta": (0.1, "target_risk", "abstention threshold"),
    "conformal_score": ("lac", "conformal_alpha", "conformal prediction sets"),
}


def _resolve_selective_flags(args: argparse.Namespace) -> None:
    """Refuse a selective-rule flag without the fit it tunes, then fill in the defaults.

    Without it, ``calibrate --score entropy`` would silently refit only the temperature and drop the
    stored rule.
    """
    for name, (default, needs, fit) in _SELECTIVE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif getattr(args, needs) is None:
            flag, needed = (f"--{n.replace('_', '-')}" for n in (name, needs))
            raise FreeTicketsError(f"{flag} tunes the {fit} that {needed} fits: add {needed} (nothing was changed)")


def _calibration_rows(args: argparse.Namespace, count: int) -> tuple[Any, Any]:
    """Rows of the held-out split for the temperature and for the selective rule (None: not fitted).

    Fitting both in one command gives each its own half (a seeded permutation), so the rule is
    fitted on images the temperature never saw; ``--keep-temperature`` gives the rule every row.
    """
    import numpy as np

    everything = np.arange(count)
    if args.target_risk is None and args.conformal_alpha is None:
        if args.keep_temperature:
            raise FreeTicketsError("--keep-temperature leaves nothing to fit: add --target-risk or --conformal-alpha")
        return everything, None
    if args.keep_temperature:
        return None, everything
    order = np.random.default_rng(0).permutation(count)
    return np.sort(order[: count // 2]), np.sort(order[count // 2 :])


def _fit_selective(
    args: argparse.Namespace, model: Any, logits: Any, labels: Any, rows: Any, count: int
) -> SelectiveConfig | None:
    """The abstention threshold and/or conformal sets on the calibrated outputs of ``rows``; printed.

    Returns None when neither was asked for (a new temperature has dropped any stored rule already).

    Raises:
        InfeasibleRiskError: no threshold meets ``--target-risk``.
        ValueError: ``--conformal-alpha`` needs more images than ``rows`` holds.
    """
    from freetickets_hub.data import public_dataset
    from freetickets_hub.uncertainty.outputs import combine_member_logits
    from freetickets_hub.uncertainty.selective import fit_conformal, fit_threshold

    if rows is None:
        return None
    output = combine_member_logits(logits[:, rows], model.temperature)
    outputs = {key: getattr(output, key).double().numpy() for key in ("probs", "entropy", "mutual_information")}
    y = labels[rows].numpy()
    fit_on = f"{public_dataset(args.dataset)}:{args.split} " + (
        f"({count} images; temperature {model.temperature:.4f} kept)"
        if args.keep_temperature
        else f"({len(rows)} of {count} images; the other half fitted the temperature)"
    )
    stored: dict[str, Any] = {"n": len(rows), "fit_on": fit_on}
    if args.target_risk is not None:
        fit = fit_threshold(outputs, y, score=args.score, target_risk=args.target_risk, delta=args.delta)
        relation = ">=" if fit.score == "confidence" else "<="
        print(
            f"abstention: answer when {fit.score} {relation} {fit.threshold:.6g}; on {fit.num_images} held-out images "
            f"it answers {100 * fit.coverage:.2f}% with error rate {fit.risk:.4f}, so the error rate of answered "
            f"images is <= {fit.target_risk} with probability >= {1 - fit.delta:g} (Learn-then-Test, binomial p-value "
            f"{fit.p_value:.3g})"
        )
        stored.update(
            score=fit.score,
            threshold=fit.threshold,
            target_risk=fit.target_risk,
            delta=fit.delta,
            calibration_coverage=fit.coverage,
            calibration_risk=fit.risk,
        )
    if args.conformal_alpha is not None:
        conformal = fit_conformal(outputs["probs"], y, alpha=args.conformal_alpha, score=args.conformal_score)
        print(
            f"conformal sets ({conformal.score}): quantile {conformal.quantile:.6g} on {conformal.num_images} held-out "
            f"images, mean set size {conformal.mean_set_size:.3f}; sets cover the true label with probability "
            f">= {1 - conformal.alpha:g}"
        )
        stored.update(
            conformal_alpha=conformal.alpha, conformal_score=conformal.score, conformal_quantile=conformal.quantile
        )
    return SelectiveConfig(**stored)


def held_out_rows(
    model: str, dataset: str, split: str, dataset_config: str | None = None
) -> tuple[str, list[int] | None]:
    """``--split validation`` on data without such a split means the run's own validation carve.

    The model folder's ``train_summary.json`` names the dataset, train split, seed and ``val_size``
    the trainer carved with; the same rows are selected again, so the fit never sees training images.
    """
    import json
    import os

    from freetickets_hub.artifact.names import SUMMARY_NAME
    from freetickets_hub.data import resolve_dataset, run_validation_rows

    summary_path = os.path.join(model, SUMMARY_NAME)
    if split != "validation" or not os.path.isfile(summary_path):
        return split, None
    import datasets

    if "validation" in datasets.get_dataset_split_names(dataset, dataset_config):
        return split, None
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    recipe = summary["recipe"]
    if not recipe.get("val_size"):
        raise FreeTicketsError(f"{dataset!r} has no 'validation' split and the run carved none (val_size 0)")
    if not _same_dataset(resolve_dataset(recipe["dataset"]), dataset):
        raise FreeTicketsError(
            f"the run trained on {recipe['dataset']!r}, not {dataset!r}: name a held-out split of this dataset"
        )
    rows = run_validation_rows(recipe, dataset)
    held_out = f"the {len(rows)} images the run held out of {recipe['train_split']!r} (seed {recipe['seed']})"
    print(f"--split validation: {held_out}")
    return recipe["train_split"], rows


def _same_dataset(a: str, b: str) -> bool:
    """Whether two ``datasets`` sources name the same data, however a local path is spelled."""
    import os

    if os.path.exists(a) or os.path.exists(b):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a == b


def _add_selective_arguments(p: argparse.ArgumentParser) -> None:
    from freetickets_hub.artifact.config import CONFORMAL_SCORES, SELECTIVE_SCORES

    group = p.add_argument_group(
        "selective prediction (fitted after the temperature, on its own half of the split when both are fitted)"
    )
    group.add_argument(
        "--target-risk", type=probability, default=None, metavar="R",
        help="fit an abstention threshold: error rate of the answered images <= R with probability >= 1 - delta",
    )  # fmt: skip
    group.add_argument("--delta", type=probability, default=None, help="failure probability of that bound (0.1)")
    group.add_argument("--score", choices=SELECTIVE_SCORES, default=None, help="the threshold's score (confidence)")
    group.add_argument(
        "--conformal-alpha", type=probability, default=None, metavar="A",
        help="fit conformal prediction sets holding the true label with probability >= 1 - A",
    )  # fmt: skip
    group.add_argument("--conformal-score", choices=CONFORMAL_SCORES, default=None, help="conformity score (lac)")
    group.add_argument(
        "--keep-temperature", action="store_true",
        help="keep the stored temperature and fit only the selective rule, on every image of the split",
    )  # fmt: skip
