"""The ``freetickets`` command (also ``python -m freetickets_hub.cli``, so ``accelerate launch -m`` works).

Each verb imports what it needs when it runs, so ``freetickets --help`` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freetickets_hub import __version__
from freetickets_hub.artifact.config import SelectiveConfig
from freetickets_hub.errors import FreeTicketsError, RecipeError

if TYPE_CHECKING:
    from freetickets_hub.export.quantize import Int8Calibration

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from freetickets_hub.artifact.files import prepare_output_dir
    from freetickets_hub.training import load_recipe, train
    from freetickets_hub.training.checkpoint import latest_checkpoint

    if args.resume and args.overwrite:
        raise FreeTicketsError("--resume continues the run in --output-dir, --overwrite replaces it: pass one")
    recipe = load_recipe(args.recipe, args.set)
    check_architecture(recipe.architecture)
    output_dir = Path(args.output_dir)
    if args.resume and latest_checkpoint(output_dir) is None and (output_dir / "config.json").is_file():
        raise FreeTicketsError(
            f"--resume: {str(output_dir)!r} holds a finished model and no checkpoint to continue from; "
            "nothing was changed (pass --overwrite instead of --resume to train it again)"
        )
    prepare_output_dir(output_dir, overwrite=args.overwrite, resume=args.resume, can_resume=True)
    summary = train(recipe, args.output_dir, resume=args.resume, max_steps=args.max_steps, report_to=args.report_to)
    if summary:
        print(format_summary_table(summary))
        print(f"wrote {args.output_dir}")
    return 0


def check_architecture(name: str) -> None:
    """Fail before any data loads when timm does not know ``name`` (our own WRNs included).

    Raises:
        RecipeError: naming the closest registered architectures.
    """
    import difflib

    import timm

    from freetickets_hub.model import architectures as _architectures  # noqa: F401  (registers the WRNs)

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else " (see timm.list_models())"
        raise RecipeError(f"unknown architecture {name!r}: timm has no such model{hint}")


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
        search_lr=args.search_lr,
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
        int8 = _int8_calibration(args) if args.quantize == "int8" else None
        report = export_onnx(
            args.model,
            args.output,
            opset=args.opset,
            fp16=args.fp16,
            images=args.images,
            compact=not args.dense_graph,
            int8=int8,
        )
    except (ValueError, OSError) as err:  # a bad --opset, a missing --output or an unreadable --images file
        if args.verbose:
            traceback.print_exc()
        print(f"freetickets export onnx: error: {err}", file=sys.stderr)
        return 2
    print(report.to_json(), end="")
    print(f"wrote {args.output or args.model}/{report.graph}")
    return 0


def _export_triton(args: argparse.Namespace) -> int:
    from freetickets_hub.export.triton import export_triton

    try:
        config_path = export_triton(
            args.model,
            args.output_dir,
            name=args.name,
            max_batch_size=args.max_batch_size,
            instances=args.instances,
            kind=args.kind,
            max_queue=args.max_queue,
            max_delay_ms=args.max_delay_ms,
            backend=args.backend,
        )
    except (ValueError, OSError) as err:  # bad flags, no onnx/model.onnx, an unwritable folder
        print(f"freetickets export triton: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {config_path.parent} (Triton model repository {args.output_dir})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from freetickets_hub.serving.engine import check_graph, check_model
    from freetickets_hub.serving.server import run_server
    from freetickets_hub.serving.service import ServeSettings

    try:
        settings = ServeSettings(
            args.model,
            backend=args.backend,
            host=args.host,
            port=args.port,
            max_batch_size=args.max_batch_size,
            max_delay_ms=args.max_delay_ms,
            max_queue=args.max_queue,
            max_body_mb=args.max_body_mb,
            workers=args.workers,
            name=args.name,
            variant=args.variant,
            keep_alive_s=args.keep_alive_s,
            body_timeout_s=args.body_timeout_s,
            drain_timeout_s=args.drain_timeout_s,
            docs=args.docs,
        )
    except ValueError as err:
        print(f"freetickets serve: error: {err}", file=sys.stderr)
        return 2
    check_model(settings.model, settings.backend, settings.variant)  # one line naming the fix, before any process
    if settings.backend == "onnx":
        check_graph(settings.model, settings.variant)  # a corrupt graph never binds the port (openvino: in its loader)
    return run_server(settings)


def _int8_calibration(args: argparse.Namespace) -> Int8Calibration:
    """Calibration and gate images for ``export onnx --quantize int8``, from a held-out split."""
    from freetickets_hub.artifact.config import EnsembleConfig
    from freetickets_hub.artifact.hub import CONFIG_NAME, resolve_file
    from freetickets_hub.errors import DatasetError
    from freetickets_hub.evaluation.data import load_eval_split
    from freetickets_hub.export.quantize import calibration_from_split

    if args.calibration_dataset is None:
        raise FreeTicketsError("--quantize int8 needs --calibration-dataset (real images to calibrate and check on)")
    if "test" in args.calibration_split.lower():
        raise DatasetError(
            f"refusing to calibrate on split {args.calibration_split!r}: it looks like a test split "
            "(use held-out data, e.g. --calibration-split validation)"
        )
    config = EnsembleConfig.from_json_file(str(resolve_file(args.model, CONFIG_NAME)))
    held_out = argparse.Namespace(
        model=args.model,
        dataset=args.calibration_dataset,
        dataset_config=args.calibration_dataset_config,
        split=args.calibration_split,
    )
    split, rows = _held_out_rows(held_out)
    data = load_eval_split(
        args.calibration_dataset,
        config,
        split=split,
        dataset_config=args.calibration_dataset_config,
        max_samples=args.calibration_samples + args.held_out_samples,
        rows=rows,
    )
    calibration = calibration_from_split(data, config, args.calibration_samples)
    if rows is not None:  # name the carve, not the training split it was taken from
        calibration.source = f"{args.calibration_dataset}:validation (the run's carve of {split!r})"
    return calibration


def _held_out_rows(args: argparse.Namespace) -> tuple[str, list[int] | None]:
    """``--split validation`` on data without such a split means the run's own validation carve.

    The model folder's ``train_summary.json`` names the dataset, train split, seed and ``val_size``
    the trainer carved with; the same rows are selected again, so the fit never sees training images.
    """
    import json
    import os

    from freetickets_hub.evaluation.data import validation_carve
    from freetickets_hub.model.card import SUMMARY_NAME

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
    from freetickets_hub.training.data import resolve_dataset

    if not _same_dataset(resolve_dataset(recipe["dataset"]), args.dataset):
        raise FreeTicketsError(
            f"the run trained on {recipe['dataset']!r}, not {args.dataset!r}: name a held-out split of this dataset"
        )
    train = datasets.load_dataset(args.dataset, args.dataset_config, split=recipe["train_split"])
    rows, _ = validation_carve(len(train), recipe["val_size"], recipe["seed"])
    held_out = f"the {len(rows)} images the run held out of {recipe['train_split']!r} (seed {recipe['seed']})"
    print(f"--split validation: {held_out}")
    return recipe["train_split"], rows.tolist()


def _same_dataset(a: str, b: str) -> bool:
    """Whether two ``datasets`` sources name the same data, however a local path is spelled."""
    import os

    if os.path.exists(a) or os.path.exists(b):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a == b


def _calibrate(args: argparse.Namespace) -> int:
    import os

    from freetickets_hub import EnsembleModel
    from freetickets_hub.artifact.files import check_writable, prepare_output_dir, write_text_atomic
    from freetickets_hub.artifact.hub import CONFIG_NAME
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
        model.set_temperature(fit.temperature, fit_on=f"{args.dataset}:{args.split} ({count})")
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
    from freetickets_hub.uncertainty.outputs import combine_member_logits
    from freetickets_hub.uncertainty.selective import fit_conformal, fit_threshold

    if rows is None:
        return None
    output = combine_member_logits(logits[:, rows], model.temperature)
    outputs = {key: getattr(output, key).double().numpy() for key in ("probs", "entropy", "mutual_information")}
    y = labels[rows].numpy()
    fit_on = f"{args.dataset}:{args.split} " + (
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


def _probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _evaluate(args: argparse.Namespace) -> int:
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
        if args.verbose:
            traceback.print_exc()
        print(f"freetickets push: error: the Hub refused the upload: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"pushed {args.model} to {args.repo_id}: {commit.pr_url or commit.commit_url}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    import os

    from freetickets_hub import EnsembleModel
    from freetickets_hub.artifact.files import prepare_output_dir
    from freetickets_hub.model.merge import merge_ensembles

    exists = os.path.exists(args.output)
    inputs = [run for run in args.runs if exists and os.path.exists(run) and os.path.samefile(run, args.output)]
    if inputs:
        raise FreeTicketsError(f"--output-dir {args.output!r} is one of the runs being merged; choose a new folder")
    prepare_output_dir(args.output, overwrite=args.overwrite)
    models = [EnsembleModel.from_pretrained(run) for run in args.runs]
    merged = merge_ensembles(models, names=args.runs)
    merged.save_pretrained(args.output)
    print(
        f"merged {len(models)} runs into {merged.num_members} members "
        f"(method {merged.config.ensemble.method}, sparsity {merged.config.ensemble.sparsity}); wrote {args.output}"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json
    import os

    from freetickets_hub.artifact.hub import ONNX_NAME

    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(map(repr, missing))}")
    backend = args.backend
    if backend == "auto":
        backend = "onnx" if os.path.isfile(os.path.join(args.model, ONNX_NAME)) else "torch"
    if backend == "onnx":
        from freetickets_hub.engines.onnxruntime import OnnxEnsemble

        model = OnnxEnsemble.from_pretrained(args.model)
    else:
        from freetickets_hub import EnsembleModel

        model = EnsembleModel.from_pretrained(args.model)
    num_classes = model.config.num_classes
    if not 1 <= args.top_k <= num_classes:
        raise FreeTicketsError(f"--top-k must be from 1 to {num_classes} (the number of classes), got {args.top_k}")
    paths, images = _readable_images(args.images, model.config.pretrained_cfg["input_size"])
    if not images:
        raise FreeTicketsError(f"none of the {len(args.images)} image(s) can be read (see the lines above)")
    records = model.predict(images, batch_size=args.batch_size).to_records(top_k=args.top_k)
    if args.json:
        print(json.dumps([{"image": path, **record} for path, record in zip(paths, records, strict=True)], indent=2))
        return 0
    selective = "abstain" in records[0]
    width = max(len("image"), *(len(path) for path in paths))
    header = f"{'image':<{width}}  {'label':<16} {'conf':>6} {'entropy':>8} {'MI':>8} {'disagree':>8}"
    header += f" {'abstain':>7}  prediction set" if selective else ""
    lines = [header + ("  top-k" if args.top_k > 1 else "")]
    for path, r in zip(paths, records, strict=True):
        line = (
            f"{path:<{width}}  {r['label']:<16} {r['confidence']:>6.3f} {r['entropy']:>8.4f} "
            f"{r['mutual_information']:>8.4f} {r['disagreement']:>8.2f}"
        )
        if selective:
            prediction_set = r.get("prediction_set")
            shown = "{" + ", ".join(map(str, prediction_set)) + "}" if prediction_set is not None else "-"
            line += f" {'yes' if r['abstain'] else 'no':>7}  {shown}"
        if args.top_k > 1:
            line += "  " + ", ".join(f"{k['label']} {k['probability']:.3f}" for k in r["top_k"])
        lines.append(line)
    print("\n".join(lines))
    print(f"({backend} backend; entropy = total uncertainty, MI = epistemic, in nats)")
    return 0


def _readable_images(paths: list[str], input_size: list[int]) -> tuple[list[str], list[Any]]:
    """The images ``predict`` can read, decoded once; one stderr line per file skipped or far too small."""
    from freetickets_hub.engines.preprocessing import open_image
    from freetickets_hub.errors import ImageError

    kept, images = [], []
    for path in paths:
        try:
            image = open_image(path, name=path)
        except ImageError as err:
            print(f"freetickets predict: skipped {err}", file=sys.stderr)
            continue
        if min(image.size) * 4 < min(input_size[1:]):
            print(
                f"freetickets predict: warning: {path} is {image.width}x{image.height} pixels, far smaller than the "
                f"model's input {input_size[2]}x{input_size[1]}; its prediction means little",
                file=sys.stderr,
            )
        kept.append(path)
        images.append(image)
    return kept, images


def _add_selective_arguments(p: argparse.ArgumentParser) -> None:
    from freetickets_hub.artifact.config import CONFORMAL_SCORES, SELECTIVE_SCORES

    group = p.add_argument_group(
        "selective prediction (fitted after the temperature, on its own half of the split when both are fitted)"
    )
    group.add_argument(
        "--target-risk", type=_probability, default=None, metavar="R",
        help="fit an abstention threshold: error rate of the answered images <= R with probability >= 1 - delta",
    )  # fmt: skip
    group.add_argument("--delta", type=_probability, default=None, help="failure probability of that bound (0.1)")
    group.add_argument("--score", choices=SELECTIVE_SCORES, default=None, help="the threshold's score (confidence)")
    group.add_argument(
        "--conformal-alpha", type=_probability, default=None, metavar="A",
        help="fit conformal prediction sets holding the true label with probability >= 1 - A",
    )  # fmt: skip
    group.add_argument("--conformal-score", choices=CONFORMAL_SCORES, default=None, help="conformity score (lac)")
    group.add_argument(
        "--keep-temperature", action="store_true",
        help="keep the stored temperature and fit only the selective rule, on every image of the split",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from freetickets_hub.serving.engine import BACKENDS  # numpy only: the parser stays torch-free

    parser = argparse.ArgumentParser(prog="freetickets", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train a DST/EDST/dense ensemble from a recipe")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. training/recipes/fmnist_tiny_edst.yaml")
    p.add_argument("--output-dir", "--output", required=True, help="folder to write the Hub-ready ensemble to")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--report-to", default=None, help="accelerate tracker, e.g. tensorboard (optional)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
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
    p.add_argument(
        "--search-lr", action="store_true",
        help="first pick lr and backbone_lr by validation NLL from 6 short runs (needs val_size > 0)",
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
    p.add_argument(
        "--output-dir", "--output", dest="output", default=None, help="folder to write onnx/ to (default: MODEL)"
    )
    p.add_argument("--opset", type=int, default=20, help="ONNX opset, 18 or newer (default: 20)")
    p.add_argument("--fp16", action="store_true", help="float16 members (input and outputs stay float32)")
    p.add_argument("--images", nargs="+", default=None, metavar="FILE", help="check images (default: synthetic)")
    p.add_argument(
        "--dense-graph", action="store_true", help="store masked weights densely (default: bit mask + values)"
    )
    p.add_argument(
        "--quantize", choices=("int8",), default=None,
        help="also write onnx/model.int8.onnx (static QDQ), kept only if it passes its quality gate",
    )  # fmt: skip
    p.add_argument("--calibration-dataset", default=None, help="datasets source for --quantize (Hub id or folder)")
    p.add_argument(
        "--calibration-split", default="validation",
        help="held-out split to calibrate and check on (default: validation; the run's own carve if DS has none)",
    )  # fmt: skip
    p.add_argument("--calibration-dataset-config", default=None, help="datasets configuration name, if several")
    p.add_argument("--calibration-samples", type=int, default=512, help="images to calibrate on (default: 512)")
    p.add_argument(
        "--held-out-samples", type=int, default=2000,
        help="further images of the split for the int8 quality gate (default: 2000)",
    )  # fmt: skip
    p.set_defaults(func=_export_onnx)
    p = formats.add_parser("triton", help="write a Triton model repository for MODEL's onnx/model.onnx")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id, exported with `export onnx`")
    p.add_argument("--output-dir", "--output", dest="output_dir", required=True, help="the model repository folder")
    p.add_argument("--name", default=None, help="the model's name in the repository (default: last part of MODEL)")
    p.add_argument("--max-batch-size", type=int, default=32, help="Triton max_batch_size (default: 32)")
    p.add_argument("--instances", type=int, default=1, help="model instances per device (default: 1)")
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance kind (default: gpu)")
    p.add_argument("--max-queue", type=int, default=256, help="dynamic batcher queue bound, requests (default: 256)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="dynamic batcher max queue delay (default: 5)")
    p.add_argument(
        "--backend", choices=("onnxruntime", "python"), default="onnxruntime",
        help="Triton backend: onnxruntime (the graph) or python (OnnxEnsemble, with abstain/prediction_set)",
    )  # fmt: skip
    p.set_defaults(func=_export_triton)
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
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    _add_selective_arguments(p)
    p.set_defaults(func=_calibrate)

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

    p = verbs.add_parser("serve", help="serve predictions over HTTP: /v1/predict, Open Inference Protocol v2, page")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id (offline cache honoured)")
    p.add_argument(
        "--backend", choices=BACKENDS, default="onnx",
        help="onnx (default: ONNX Runtime, no torch), openvino (the same graph on OpenVINO, no torch) or torch",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most images per engine call and request")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill (default: 5)")
    p.add_argument("--max-queue", type=int, default=256, help="images in the queue or engine before 503 (default: 256)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, MiB; more gets 413")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model and batcher")
    p.add_argument("--name", default=None, help="the model's name in /v2/models/{name} (default: last part of MODEL)")
    p.add_argument(
        "--variant", choices=("fp32", "int8"), default="fp32",
        help="the graph (onnx, openvino): fp32 (onnx/model.onnx) or int8 (onnx/model.int8.onnx, export --quantize)",
    )  # fmt: skip
    p.add_argument("--keep-alive-s", type=int, default=5, help="close idle connections after this (default: 5)")
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="408 when a body takes longer (default: 30)")
    p.add_argument(
        "--docs", action="store_true", help="serve Swagger UI at /docs and ReDoc at /redoc (they load from a CDN)"
    )
    p.add_argument("--drain-timeout-s", type=float, default=30.0, help="on SIGTERM, exit within this (default: 30)")
    p.set_defaults(func=_serve)

    p = verbs.add_parser("merge", help="combine members of separate runs (same architecture) into one ensemble")
    p.add_argument("runs", nargs="+", metavar="RUN", help="saved ensemble folders or Hub repo ids, two or more")
    p.add_argument(
        "--output-dir", "--output", dest="output", required=True, help="folder to write the merged ensemble to"
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.set_defaults(func=_merge)

    p = verbs.add_parser("predict", help="classify image files, with uncertainty, as a table or JSON")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG...)")
    p.add_argument("--json", action="store_true", help="print one JSON record per image instead of a table")
    p.add_argument("--top-k", type=int, default=1, help="also list the K most probable labels (default: 1)")
    p.add_argument(
        "--backend", choices=("auto", "onnx", "torch"), default="auto",
        help="engine: onnx (MODEL/onnx/model.onnx, no torch needed), torch, or auto (onnx when exported)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.set_defaults(func=_predict)
    _finish_parsers(parser)
    return parser


_VERBOSE_HELP = "log progress details (mask updates, phase switches) and show a traceback on errors"
_OVERWRITE_HELP = "replace the model already in the output folder, removing every file that described it"
# one example per verb, shown at the end of its --help
_EXAMPLES = {
    "train": "freetickets train --recipe training/recipes/fmnist_tiny_edst.yaml --output-dir runs/tiny",
    "export": "freetickets export onnx runs/tiny",
    "export onnx": "freetickets export onnx runs/tiny --opset 20",
    "calibrate": "freetickets calibrate runs/tiny --dataset ../shared/datasets/fashion_mnist --split validation",
    "evaluate": "freetickets evaluate runs/tiny --dataset ../shared/datasets/fashion_mnist "
    "--ood-dataset suite --plots runs/tiny/assets",
    "push": "freetickets push runs/tiny me/fmnist-edst --private",
    "merge": "freetickets merge runs/seed0 runs/seed1 runs/seed2 --output-dir runs/dst",
    "predict": "freetickets predict runs/tiny shirt.png boot.png --top-k 3",
    "finetune": "freetickets finetune runs/demo --dataset ../shared/datasets/fashion_mnist --output-dir runs/ft "
    "--recipe training/recipes/finetune_small.yaml --mode frozen-masks",
    "serve": "freetickets serve runs/tiny --port 8000 --max-batch-size 32",
    "export triton": "freetickets export triton runs/tiny --output-dir triton_repo --kind cpu",
}


def _finish_parsers(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every verb ``-v`` (also accepted after the verb) and its example, however it was added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                verb = f"{path} {name}".strip()
                if not any("--verbose" in a.option_strings for a in sub._actions):
                    sub.add_argument(
                        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP
                    )
                if verb in _EXAMPLES and not sub.epilog:
                    sub.epilog = f"example:\n  {_EXAMPLES[verb]}"
                    sub.formatter_class = argparse.RawDescriptionHelpFormatter
                _finish_parsers(sub, verb)


def _check_shared_flags(args: argparse.Namespace) -> None:
    """Flags several verbs share, checked before anything loads (one line and exit 2, not a traceback)."""
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise FreeTicketsError(f"--batch-size must be at least 1, got {batch_size}")


def _user_error(err: BaseException) -> bool:
    """Errors that mean the user asked for something impossible (not a bug): reported in one line."""
    if isinstance(err, (FreeTicketsError, OSError)):
        return True
    errors = sys.modules.get("huggingface_hub.errors")
    return errors is not None and isinstance(err, (errors.HfHubHTTPError, errors.HFValidationError))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        _check_shared_flags(args)
        return args.func(args)
    except Exception as err:
        if not _user_error(err):
            raise
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"freetickets {args.verb}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
