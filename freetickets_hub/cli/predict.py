"""``freetickets predict``: image files classified, with uncertainty, as a table or JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from freetickets_hub.errors import FreeTicketsError

__all__ = ["register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
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
