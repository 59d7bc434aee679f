"""``freetickets push``: a saved ensemble folder uploaded to the Hub as one commit."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
    p = verbs.add_parser("push", help="upload a saved ensemble folder to the Hub as one commit")
    p.add_argument("model", metavar="MODEL_DIR", help="a saved ensemble folder (checked by loading it first)")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, e.g. me/my-ensemble (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--commit-message", default="Upload FreeTickets ensemble", help="the commit's summary")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from freetickets_hub import EnsembleModel

    model = EnsembleModel.from_pretrained(args.model)  # validates the folder strictly before anything leaves
    commit = model.push_to_hub(  # a refusal (HfHubHTTPError) becomes one line in cli.main
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        token=args.token,
        extras_from=args.model,
    )
    print(f"pushed {args.model} to {args.repo_id}: {commit.pr_url or commit.commit_url}")
    return 0
