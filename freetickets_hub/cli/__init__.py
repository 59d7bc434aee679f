"""The ``freetickets`` command (also ``python -m freetickets_hub.cli``, so ``accelerate launch -m`` works).

One module per verb (``train``, ``finetune``, ``export``, ``calibrate``, ``evaluate``, ``push``,
``serve``, ``merge``, ``predict``), each with its flags (``register``) beside the code that reads
them (``run``), as huggingface_hub's ``commands/``. Here: the parser and the one place that turns
errors into exit codes. Each verb imports what it needs when it runs, so ``freetickets --help``
stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from freetickets_hub import __version__
from freetickets_hub.cli import calibrate, evaluate, export, finetune, merge, predict, push, serve, train
from freetickets_hub.cli.options import VERBOSE_HELP
from freetickets_hub.errors import FreeTicketsError

__all__ = ["build_parser", "main"]

VERBS = (train, finetune, export, calibrate, evaluate, push, serve, merge, predict)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freetickets", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.register(verbs)
    _finish_parsers(parser)
    return parser


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
                        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
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


def _user_error(err: BaseException, expected: tuple[type[BaseException], ...]) -> str | None:
    """The one line for an error that means the user asked for something impossible, or None for a bug.

    ``expected`` is what the verb declared (``set_defaults(user_errors=...)``) beyond this package's own
    errors and ``OSError``: e.g. ``export``'s ``ValueError`` for a bad ``--opset``.
    """
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (FreeTicketsError, OSError, *expected)):
        return message
    errors = sys.modules.get("huggingface_hub.errors")
    if errors is not None and isinstance(err, errors.HfHubHTTPError):
        return f"the Hub refused the request: {message}"
    if errors is not None and isinstance(err, errors.HFValidationError):
        return message
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        _check_shared_flags(args)
        return args.func(args)
    except Exception as err:
        message = _user_error(err, getattr(args, "user_errors", ()))
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"freetickets {args.verb}: error: {message}", file=sys.stderr)
        return 2
