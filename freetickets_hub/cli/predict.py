"""``freetickets predict``: image files classified, with uncertainty, as a table or JSON.

A file that cannot be read (not an image, truncated, too large) is skipped with one stderr line and
the others are still predicted; as ``cp`` or ``grep`` do with several operands, the exit status then
says that some failed: 0 all predicted, 1 some skipped (the results of the rest printed), 2 none.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from freetickets_hub.errors import FreeTicketsError

__all__ = ["register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
    p = verbs.add_parser(
        "predict",
        help="classify image files, with uncertainty, as a table or JSON",
        description="Classify image files. Exit status: 0 every image predicted, 1 some skipped (one stderr line "
        "each; the others are printed), 2 none readable or a bad flag.",
    )
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG...)")
    p.add_argument("--json", action="store_true", help="print one JSON record per image instead of a table")
    p.add_argument("--top-k", type=int, default=1, help="also list the K most probable labels (default: 1)")
    p.add_argument(
        "--backend", choices=("auto", "onnx", "torch"), default="auto",
        help="engine: onnx (MODEL/onnx/model.onnx, no torch needed), torch, or auto (onnx when exported)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from freetickets_hub.artifact.names import ONNX_NAME

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
    else:
        print("\n".join(_table(paths, records, args.top_k)))
        print(f"({backend} backend; entropy = total uncertainty, MI = epistemic, in nats)")
    skipped = len(args.images) - len(paths)
    if skipped:  # their own lines are above; the status tells a script that the output is not complete
        print(f"freetickets predict: {skipped} of {len(args.images)} image(s) skipped", file=sys.stderr)
    return 1 if skipped else 0


def _table(paths: list[str], records: list[dict[str, Any]], top_k: int) -> list[str]:
    """One row per image; ``abstain`` and the prediction set each get a column when the model stores that rule."""
    abstains, sets = "abstain" in records[0], "prediction_set" in records[0]
    width = max(len("image"), *(len(path) for path in paths))
    header = f"{'image':<{width}}  {'label':<16} {'conf':>6} {'entropy':>8} {'MI':>8} {'disagree':>8}"
    header += f" {'abstain':>7}" if abstains else ""
    header += "  prediction set" if sets else ""
    lines = [header + ("  top-k" if top_k > 1 else "")]
    for path, r in zip(paths, records, strict=True):
        line = (
            f"{path:<{width}}  {r['label']:<16} {r['confidence']:>6.3f} {r['entropy']:>8.4f} "
            f"{r['mutual_information']:>8.4f} {r['disagreement']:>8.2f}"
        )
        if abstains:
            line += f" {'yes' if r['abstain'] else 'no':>7}"
        if sets:
            line += "  {" + ", ".join(map(str, r["prediction_set"])) + "}"
        if top_k > 1:
            line += "  " + ", ".join(f"{k['label']} {k['probability']:.3f}" for k in r["top_k"])
        lines.append(line)
    return lines


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
