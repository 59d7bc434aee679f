"""``freetickets finetune``: a saved ensemble fine-tuned on a new dataset, keeping its sparsity."""

from __future__ import annotations

import argparse

from freetickets_hub.cli.train import format_summary_table

__all__ = ["register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
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
        help="pick lr and backbone_lr by validation NLL from 6 short runs first (3 in a linear probe; needs val_size)",
    )  # fmt: skip
    p.add_argument("--report-to", default=None, help="accelerate tracker, e.g. tensorboard (optional)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after N optimizer steps with a checkpoint (then --resume)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
