"""Flag texts and argparse types that several verbs share."""

from __future__ import annotations

import argparse

__all__ = ["OVERWRITE_HELP", "VERBOSE_HELP", "probability"]

VERBOSE_HELP = "log progress details (mask updates, phase switches) and show a traceback on errors"
OVERWRITE_HELP = "replace the model already in the output folder, removing every file that described it"


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value
