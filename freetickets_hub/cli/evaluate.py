"""``freetickets evaluate``: quality, calibration, OOD, selective prediction, corruptions, diversity."""

from __future__ import annotations

import argparse
from pathlib import Path

from freetickets_hub.errors import FreeTicketsError

__all__ = ["register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
    p = verbs.add_parser("evaluate", help="quality, calibration, OOD, selective prediction, corruptions, diversity")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("--dataset", required=True, help="datasets source (Hub id or folder)")
    p.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    p.add_argument("--dataset-config", default=None, help="datasets configuration name, if the source has several")
    p.add_argument(
        "--ood-dataset", action="append", default=[], metavar="DS",
        help="out-of-distribution set, its --ood-split (repeatable): a datasets source, sklearn:digits, "
        "synthetic:{gaussian,uniform,constant}, shift:{invert,rot90,<corruption>[@severity]}, held-out (the "
        "--dataset classes the model was not trained on), or suite (all of these that apply)",
    )  # fmt: skip
    p.add_argument(
        "--corruptions", nargs="*", default=None, metavar="NAME",
        help="corruption robustness at severities 1-5, of all corruptions or of the NAMEs given",
    )  # fmt: skip
    p.add_argument("--ood-split", default="test", help="split of each --ood-dataset (default: test)")
    p.add_argument("--output", default=None, metavar="FILE", help="write the results JSON to FILE (MODEL untouched)")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="write DIR/eval_results.json (MODEL untouched)")
    p.add_argument(
        "--no-update-card", action="store_true",
        help="leave MODEL's eval_results.json and card alone (they are updated only by a full-split evaluation)",
    )  # fmt: skip
    p.add_argument("--plots", default=None, metavar="DIR", help="write reliability/disagreement/risk-coverage PNGs")
    p.add_argument("--max-samples", type=int, default=None, help="a seeded random subset of N images of each set")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from freetickets_hub import EnsembleModel
    from freetickets_hub.artifact.files import check_writable, write_text_atomic
    from freetickets_hub.evaluation import (
        CORRUPTIONS,
        EVAL_RESULTS_NAME,
        EvalSplit,
        create_accelerator,
        evaluate,
        format_results,
        load_eval_split,
        write_plots,
        write_results,
    )
    from freetickets_hub.evaluation.ood_suite import HELD_OUT, SUITE, build_ood_splits, expand_ood_sources

    corruptions = [] if args.corruptions is None else (args.corruptions or list(CORRUPTIONS))
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        raise FreeTicketsError(f"unknown corruptions {unknown}; choose from {sorted(CORRUPTIONS)}")
    expand_ood_sources(args.ood_dataset, has_unknown_classes=False)  # a misspelt set fails before any loading
    results_files = [Path(args.output)] if args.output else []
    if args.output_dir:
        results_files.append(Path(args.output_dir) / EVAL_RESULTS_NAME)
    keep_folder = _keep_model_folder(args)
    for folder in {*(path.parent for path in results_files), *([Path(args.plots)] if args.plots else [])}:
        check_writable(folder)
    if keep_folder is None:
        check_writable(args.model)
        results_files.append(Path(args.model) / EVAL_RESULTS_NAME)
    model = EnsembleModel.from_pretrained(args.model)
    data = load_eval_split(
        args.dataset,
        model.config,
        split=args.split,
        dataset_config=args.dataset_config,
        max_samples=args.max_samples,
        keep_unknown_classes=bool({HELD_OUT, SUITE} & set(args.ood_dataset)),
    )

    def load_ood(name: str) -> EvalSplit:
        return load_eval_split(
            name, model.config, split=args.ood_split, require_labels=False, max_samples=args.max_samples
        )

    data, ood = build_ood_splits(args.ood_dataset, data, load=load_ood)
    accelerator = create_accelerator()
    results = evaluate(
        model, data, ood=ood, corruptions=corruptions, accelerator=accelerator, batch_size=args.batch_size
    )
    if not accelerator.is_main_process:
        return 0
    print(format_results(results))
    results["max_samples"] = args.max_samples  # None: every image of the split
    written = [str(path) for path in results_files]
    for path in results_files:
        write_results(results, path)
    if args.plots:
        written += [str(path) for path in write_plots(results, args.plots)]
    if keep_folder is None:  # the card's model-index and body now come from these results (and plots)
        card = model.generate_model_card(save_directory=Path(args.model))
        write_text_atomic(os.path.join(args.model, "README.md"), str(card))
        written.append(os.path.join(args.model, "README.md"))
    else:
        print(f"{args.model} left unchanged: {keep_folder}")
    print(f"wrote {', '.join(written)}" if written else "no files written (pass --output-dir DIR to keep the results)")
    return 0


def _keep_model_folder(args: argparse.Namespace) -> str | None:
    """Why ``evaluate`` must leave MODEL's ``eval_results.json`` and card alone, or None when it updates them.

    The folder's results describe the model to its users (the card's model-index), so only a full
    evaluation of a split replaces them, and only when no other destination was asked for.
    """
    import os

    if not os.path.isdir(args.model):
        return "it is a Hub repo id, not a local folder"
    if args.no_update_card:
        return "--no-update-card"
    if args.output or args.output_dir:
        return "the results went to --output/--output-dir"
    if args.max_samples is not None:
        return f"--max-samples {args.max_samples} evaluates a subset (the folder keeps full-split results only)"
    if "[" in args.split:
        return f"split {args.split!r} is a slice (the folder keeps full-split results only)"
    return None
