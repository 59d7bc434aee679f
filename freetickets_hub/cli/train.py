"""``freetickets train``: a DST/EDST/dense ensemble from a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from freetickets_hub.cli.options import OVERWRITE_HELP
from freetickets_hub.errors import RecipeError

__all__ = ["check_architecture", "format_summary_table", "register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
    p = verbs.add_parser("train", help="train a DST/EDST/dense ensemble from a recipe")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. training/recipes/fmnist_tiny_edst.yaml")
    p.add_argument("--output-dir", "--output", required=True, help="folder to write the Hub-ready ensemble to")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--report-to", default=None, help="accelerate tracker, e.g. tensorboard (optional)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after N optimizer steps with a checkpoint (then --resume)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from freetickets_hub.training import load_recipe, train
    from freetickets_hub.training.checkpoint import prepare_run_dir

    recipe = load_recipe(args.recipe, args.set)
    check_architecture(recipe.architecture)
    # before the trainer's Accelerator, which reads ACCELERATE_USE_CPU itself (PartialState does not)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    prepare_run_dir(Path(args.output_dir), state, resume=args.resume, overwrite=args.overwrite)
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
