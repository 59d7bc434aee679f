"""The ``freetickets`` command (also ``python -m freetickets_hub.cli``, so ``accelerate launch -m`` works).

Each verb imports what it needs when it runs, so ``freetickets --help`` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .errors import FreeTicketsError

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from freetickets_hub.training import load_recipe, train

    recipe = load_recipe(args.recipe, args.set)
    summary = train(recipe, args.output_dir, report_to=args.report_to)
    if summary:
        print(format_summary_table(summary))
        print(f"wrote {args.output_dir}")
    return 0


def format_summary_table(summary: dict) -> str:
    """Members vs ensemble on the test split, as a fixed-width table."""
    rows = [f"{'model':<10} {'accuracy':>9} {'NLL':>8} {'ECE':>8} {'Brier':>8}"]
    test = summary["test"]
    names = sorted((k for k in test if k.startswith("member_")), key=lambda k: int(k.split("_")[1])) + ["ensemble"]
    for name in names:
        m = test[name]
        rows.append(f"{name:<10} {m['accuracy']:>9.4f} {m['nll']:>8.4f} {m['ece']:>8.4f} {m['brier']:>8.4f}")
    return "\n".join(rows)


def _export_onnx(args: argparse.Namespace) -> int:
    from freetickets_hub.export.onnx import export_onnx

    try:
        report = export_onnx(args.model, args.output, opset=args.opset, fp16=args.fp16, images=args.images)
    except ValueError as err:  # a bad --opset, a missing --output or an unreadable --images file
        print(f"freetickets export onnx: error: {err}", file=sys.stderr)
        return 2
    print(report.to_json(), end="")
    print(f"wrote {args.output or args.model}/{report.graph}")
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
    p.set_defaults(func=_train)

    p = verbs.add_parser("export", help="export an ensemble for other runtimes")
    formats = p.add_subparsers(dest="format", required=True)
    p = formats.add_parser("onnx", help="write MODEL/onnx/model.onnx (one graph) and check it against PyTorch")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("--output", default=None, help="folder to write onnx/ to (default: MODEL, when a folder)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset, 18 or newer (default: 20)")
    p.add_argument("--fp16", action="store_true", help="float16 members (input and outputs stay float32)")
    p.add_argument("--images", nargs="+", default=None, metavar="FILE", help="check images (default: synthetic)")
    p.set_defaults(func=_export_onnx)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FreeTicketsError as err:
        print(f"freetickets {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
