"""The ``freetickets`` command (also ``python -m freetickets_hub.cli``, so ``accelerate launch -m`` works).

Each verb imports what it needs when it runs, so ``freetickets --help`` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import FreeTicketsError

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from freetickets_hub.training import load_recipe, train

    recipe = load_recipe(args.recipe, args.set)
    summary = train(recipe, args.output_dir, resume=args.resume, max_steps=args.max_steps, report_to=args.report_to)
    if summary:
        print(format_summary_table(summary))
        print(f"wrote {args.output_dir}")
    return 0


def format_summary_table(summary: dict) -> str:
    """Members vs ensemble on the test split, as a fixed-width table."""
    rows = [f"{'model':<10} {'accuracy':>9} {'NLL':>8} {'ECE':>8} {'Brier':>8}"]
    test = summary["test"]
    names = [*sorted((k for k in test if k.startswith("member_")), key=lambda k: int(k.split("_")[1])), "ensemble"]
    for name in names:
        m = test[name]
        rows.append(f"{name:<10} {m['accuracy']:>9.4f} {m['nll']:>8.4f} {m['ece']:>8.4f} {m['brier']:>8.4f}")
    return "\n".join(rows)


def _finetune(args: argparse.Namespace) -> int:
    from freetickets_hub.training.finetune import finetune, format_diversity, load_finetune_recipe

    recipe = load_finetune_recipe(
        args.recipe, args.set, base_model=args.model, dataset=args.dataset, mode=args.mode, revision=args.revision
    )
    summary = finetune(
        recipe,
        args.output_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        max_steps=args.max_steps,
        report_to=args.report_to,
        from_scratch=args.from_scratch,
    )
    if summary and args.from_scratch:
        print(format_summary_table(summary))
        print(f"wrote {args.output_dir} (the same recipe from scratch: a baseline)")
    elif summary:
        print(format_summary_table(summary))
        print(format_diversity(summary))
        print(f"wrote {args.output_dir} (fine-tuned from {summary['base_model']})")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from freetickets_hub.export.onnx import export_onnx

    try:
        report = export_onnx(args.model, args.output, opset=args.opset, fp16=args.fp16, images=args.images)
    except (ValueError, OSError) as err:  # a bad --opset, a missing --output or an unreadable --images file
        print(f"freetickets export onnx: error: {err}", file=sys.stderr)
        return 2
    print(report.to_json(), end="")
    print(f"wrote {args.output or args.model}/{report.graph}")
    return 0


def _held_out_rows(args: argparse.Namespace) -> tuple[str, list[int] | None]:
    """``--split validation`` on data without such a split means the run's own validation carve.

    The model folder's ``train_summary.json`` names the dataset, train split, seed and ``val_size``
    the trainer carved with; the same rows are selected again, so the fit never sees training images.
    """
    import json
    import os

    from freetickets_hub.evaluation.data import validation_carve
    from freetickets_hub.model_card import SUMMARY_NAME

    summary_path = os.path.join(args.model, SUMMARY_NAME)
    if args.split != "validation" or not os.path.isfile(summary_path):
        return args.split, None
    import datasets

    if "validation" in datasets.get_dataset_split_names(args.dataset, args.dataset_config):
        return args.split, None
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    recipe = summary["recipe"]
    if not recipe.get("val_size"):
        raise FreeTicketsError(f"{args.dataset!r} has no 'validation' split and the run carved none (val_size 0)")
    if os.path.abspath(recipe["dataset"]) != os.path.abspath(args.dataset) and recipe["dataset"] != args.dataset:
        raise FreeTicketsError(
            f"the run trained on {recipe['dataset']!r}, not {args.dataset!r}: name a held-out split of this dataset"
        )
    train = datasets.load_dataset(args.dataset, args.dataset_config, split=recipe["train_split"])
    rows, _ = validation_carve(len(train), recipe["val_size"], recipe["seed"])
    held_out = f"the {len(rows)} images the run held out of {recipe['train_split']!r} (seed {recipe['seed']})"
    print(f"--split validation: {held_out}")
    return recipe["train_split"], rows.tolist()


def _calibrate(args: argparse.Namespace) -> int:
    import os

    from freetickets_hub import EnsembleModel
    from freetickets_hub.calibration import fit_temperature
    from freetickets_hub.errors import DatasetError
    from freetickets_hub.evaluation import create_accelerator, load_eval_split, run_inference
    from freetickets_hub.files import write_text_atomic
    from freetickets_hub.hub import CONFIG_NAME

    if "test" in args.split.lower() and not args.force:
        raise DatasetError(
            f"refusing to fit on split {args.split!r}: it looks like a test split (fit on held-out data, "
            "e.g. --split validation or --split 'train[:5000]'; --force overrides)"
        )
    local = os.path.isdir(args.model)
    if not local and args.output is None:
        raise FreeTicketsError(
            f"{args.model!r} is not a local folder; pass --output DIR to save the calibrated ensemble"
        )
    model = EnsembleModel.from_pretrained(args.model)
    split, rows = _held_out_rows(args)
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
    fit = fit_temperature(logits, data.labels, previous_temperature=model.temperature)
    if not accelerator.is_main_process:
        return 0
    print(f"temperature {fit.previous_temperature:.4f} -> {fit.temperature:.4f} fitted on {data.description}")
    print(f"{'':<7} {'NLL':>8} {'ECE':>8}")
    print(f"{'before':<7} {fit.nll_before:>8.4f} {fit.ece_before:>8.4f}")
    print(f"{'after':<7} {fit.nll_after:>8.4f} {fit.ece_after:>8.4f}")
    if fit.degenerate:
        print(f"freetickets calibrate: error: degenerate fit, temperature not stored: {fit.reason}", file=sys.stderr)
        return 3
    model.set_temperature(fit.temperature, fit_on=f"{args.dataset}:{args.split} ({len(data)} images)")
    if args.output is None:  # the weights stay as they are: only config.json and the card change
        write_text_atomic(os.path.join(args.model, CONFIG_NAME), model.config.to_json())
        card = model.generate_model_card(save_directory=Path(args.model))
        write_text_atomic(os.path.join(args.model, "README.md"), str(card))
        print(f"wrote {os.path.join(args.model, CONFIG_NAME)} and the model card")
        if os.path.isfile(os.path.join(args.model, "onnx", "model.onnx")):
            print(
                f"note: {args.model}/onnx/model.onnx still has the old temperature; "
                f"re-run `freetickets export onnx {args.model}` (OnnxEnsemble refuses the stale graph)"
            )
    else:
        model.save_pretrained(args.output)
        print(f"wrote {args.output}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import os

    from freetickets_hub import EnsembleModel
    from freetickets_hub.evaluation import (
        CORRUPTIONS,
        EVAL_RESULTS_NAME,
        create_accelerator,
        evaluate,
        format_results,
        load_eval_split,
        write_plots,
        write_results,
    )
    from freetickets_hub.files import write_text_atomic

    corruptions = [] if args.corruptions is None else (args.corruptions or list(CORRUPTIONS))
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        raise FreeTicketsError(f"unknown corruptions {unknown}; choose from {sorted(CORRUPTIONS)}")
    model = EnsembleModel.from_pretrained(args.model)
    data = load_eval_split(
        args.dataset, model.config, split=args.split, dataset_config=args.dataset_config, max_samples=args.max_samples
    )
    ood = [
        load_eval_split(name, model.config, require_labels=False, max_samples=args.max_samples)
        for name in args.ood_dataset
    ]
    accelerator = create_accelerator()
    results = evaluate(
        model, data, ood=ood, corruptions=corruptions, accelerator=accelerator, batch_size=args.batch_size
    )
    if not accelerator.is_main_process:
        return 0
    print(format_results(results))
    written = [args.output] if args.output else []
    if os.path.isdir(args.model):  # the model card reads it from there
        written.append(os.path.join(args.model, EVAL_RESULTS_NAME))
    for path in written:
        write_results(results, path)
    if args.plots:
        written += [str(path) for path in write_plots(results, args.plots)]
    if os.path.isdir(args.model):  # the card's model-index and body now come from these results (and plots)
        card = model.generate_model_card(save_directory=Path(args.model))
        write_text_atomic(os.path.join(args.model, "README.md"), str(card))
        written.append(os.path.join(args.model, "README.md"))
    print(f"wrote {', '.join(written)}" if written else "no files written (MODEL is a Hub id; pass --output)")
    return 0


def _push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from freetickets_hub import EnsembleModel

    model = EnsembleModel.from_pretrained(args.model)  # validates the folder strictly before anything leaves
    try:
        commit = model.push_to_hub(
            args.repo_id,
            private=args.private or None,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
            token=args.token,
            extras_from=args.model,
        )
    except HfHubHTTPError as err:
        print(f"freetickets push: error: the Hub refused the upload: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.model} to {args.repo_id}: {commit.pr_url or commit.commit_url}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from freetickets_hub import EnsembleModel
    from freetickets_hub.merge import merge_ensembles

    models = [EnsembleModel.from_pretrained(run) for run in args.runs]
    merged = merge_ensembles(models, names=args.runs)
    merged.save_pretrained(args.output)
    print(
        f"merged {len(models)} runs into {merged.num_members} members "
        f"(method {merged.config.ensemble.method}, sparsity {merged.config.ensemble.sparsity}); wrote {args.output}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freetickets", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log mask updates and phase switches")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train a DST/EDST/dense ensemble from a recipe")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. training/recipes/fmnist_tiny_edst.yaml")
    p.add_argument("--output-dir", required=True, help="folder to write the Hub-ready ensemble to")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--report-to", default=None, help="accelerate tracker, e.g. tensorboard (optional)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after N optimizer steps with a checkpoint (then --resume)"
    )
    p.set_defaults(func=_train)

    p = verbs.add_parser("finetune", help="fine-tune a saved ensemble on a new dataset, keeping its sparsity")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id (HF_HUB_OFFLINE=1: the cache only)")
    p.add_argument("--dataset", default=None, help="datasets source (Hub id or folder); default: the recipe's")
    p.add_argument("--output-dir", required=True, help="folder to write the fine-tuned ensemble to")
    p.add_argument("--recipe", default=None, help="YAML fine-tuning recipe, e.g. training/recipes/finetune_small.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument(
        "--mode", choices=["frozen-masks", "dst", "linear-probe"], default=None,
        help="frozen-masks (default): masks unchanged; dst: prune/regrow continues; linear-probe: heads only",
    )  # fmt: skip
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of MODEL")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --output-dir")
    p.add_argument(
        "--from-scratch", action="store_true",
        help="baseline: the same recipe and steps from a random init and masks at MODEL's sparsity",
    )  # fmt: skip
    p.add_argument("--report-to", default=None, help="accelerate tracker, e.g. tensorboard (optional)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after N optimizer steps with a checkpoint (then --resume)"
    )
    p.set_defaults(func=_finetune)

    p = verbs.add_parser("export", help="export an ensemble for other runtimes")
    formats = p.add_subparsers(dest="format", required=True)
    p = formats.add_parser("onnx", help="write MODEL/onnx/model.onnx (one graph) and check it against PyTorch")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("--output", default=None, help="folder to write onnx/ to (default: MODEL, when a folder)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset, 18 or newer (default: 20)")
    p.add_argument("--fp16", action="store_true", help="float16 members (input and outputs stay float32)")
    p.add_argument("--images", nargs="+", default=None, metavar="FILE", help="check images (default: synthetic)")
    p.set_defaults(func=_export_onnx)
    p = verbs.add_parser("calibrate", help="fit the temperature on a held-out split and store it in config.json")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("--dataset", required=True, help="datasets source (Hub id or folder)")
    p.add_argument("--split", required=True, help="held-out split, slicing allowed: validation, 'train[:5000]'")
    p.add_argument("--dataset-config", default=None, help="datasets configuration name, if the source has several")
    p.add_argument("--max-samples", type=int, default=None, help="fit on a seeded random subset of N images")
    p.add_argument("--force", action="store_true", help="allow a split whose name contains 'test'")
    p.add_argument("--output", default=None, help="save the calibrated ensemble here (required for a Hub id)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    p.set_defaults(func=_calibrate)

    p = verbs.add_parser("evaluate", help="quality, calibration, OOD, selective prediction, corruptions, diversity")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("--dataset", required=True, help="datasets source (Hub id or folder)")
    p.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    p.add_argument("--dataset-config", default=None, help="datasets configuration name, if the source has several")
    p.add_argument(
        "--ood-dataset", action="append", default=[], metavar="DS",
        help="out-of-distribution set, its 'test' split (repeatable); built-in: sklearn:digits",
    )  # fmt: skip
    p.add_argument(
        "--corruptions", nargs="*", default=None, metavar="NAME",
        help="corruption robustness at severities 1-5, of all corruptions or of the NAMEs given",
    )  # fmt: skip
    p.add_argument("--output", default=None, help="also write the results JSON here")
    p.add_argument("--plots", default=None, metavar="DIR", help="write reliability/disagreement/risk-coverage PNGs")
    p.add_argument("--max-samples", type=int, default=None, help="a seeded random subset of N images of each set")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    p.set_defaults(func=_evaluate)

    p = verbs.add_parser("push", help="upload a saved ensemble folder to the Hub as one commit")
    p.add_argument("model", metavar="MODEL_DIR", help="a saved ensemble folder (checked by loading it first)")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, e.g. me/my-ensemble (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--commit-message", default="Upload FreeTickets ensemble", help="the commit's summary")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")
    p.set_defaults(func=_push)

    p = verbs.add_parser("merge", help="combine members of separate runs (same architecture) into one ensemble")
    p.add_argument("runs", nargs="+", metavar="RUN", help="saved ensemble folders or Hub repo ids, two or more")
    p.add_argument("--output", required=True, help="folder to write the merged ensemble to")
    p.set_defaults(func=_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except FreeTicketsError as err:
        print(f"freetickets {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
