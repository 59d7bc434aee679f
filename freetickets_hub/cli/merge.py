"""``freetickets merge``: members of separate runs combined into one ensemble."""

from __future__ import annotations

import argparse

from freetickets_hub.cli.options import OVERWRITE_HELP
from freetickets_hub.errors import FreeTicketsError

__all__ = ["register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
    p = verbs.add_parser("merge", help="combine members of separate runs (same architecture) into one ensemble")
    p.add_argument("runs", nargs="+", metavar="RUN", help="saved ensemble folders or Hub repo ids, two or more")
    p.add_argument(
        "--output-dir", "--output", dest="output", required=True, help="folder to write the merged ensemble to"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
