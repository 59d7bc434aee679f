"""``freetickets export onnx`` / ``export triton``: the ensemble for other runtimes."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from freetickets_hub.cli.calibrate import held_out_rows
from freetickets_hub.errors import FreeTicketsError

if TYPE_CHECKING:
    from freetickets_hub.export.quantize import Int8Calibration


__all__ = ["register", "run_onnx", "run_triton"]

DEFAULT_HELD_OUT = 2000  # int8 gate images without --held-out-samples (fewer when the split has fewer left)


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
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
        "--packed", action="store_true",
        help="members as one network of grouped convolutions (members at equal widths; default: M branches)",
    )  # fmt: skip
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
        "--held-out-samples", type=int, default=None,
        help=f"further images of the split for the int8 quality gate, exactly N (default: up to {DEFAULT_HELD_OUT})",
    )  # fmt: skip
    p.set_defaults(func=run_onnx, user_errors=(ValueError,))  # a bad --opset or --images file
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
    p.set_defaults(func=run_triton, user_errors=(ValueError,))  # bad flags, no onnx/model.onnx


def run_onnx(args: argparse.Namespace) -> int:
    from freetickets_hub.export.onnx import export_onnx

    int8 = _int8_calibration(args) if args.quantize == "int8" else None
    report = export_onnx(
        args.model,
        args.output,
        opset=args.opset,
        fp16=args.fp16,
        images=args.images,
        compact=not args.dense_graph,
        int8=int8,
        packed=args.packed,
    )
    print(report.to_json(), end="")
    print(f"wrote {args.output or args.model}/{report.graph}")
    return 0


def run_triton(args: argparse.Namespace) -> int:
    from freetickets_hub.export.triton import export_triton

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
    print(f"wrote {config_path.parent} (Triton model repository {args.output_dir})")
    return 0


def _int8_calibration(args: argparse.Namespace) -> Int8Calibration:
    """Calibration and gate images for ``export onnx --quantize int8``, from a held-out split."""
    from freetickets_hub.artifact.config import EnsembleConfig
    from freetickets_hub.artifact.hub import resolve_file
    from freetickets_hub.artifact.names import CONFIG_NAME
    from freetickets_hub.data import load_eval_split, public_dataset
    from freetickets_hub.errors import DatasetError
    from freetickets_hub.export.quantize import calibration_from_split

    if args.calibration_dataset is None:
        raise FreeTicketsError("--quantize int8 needs --calibration-dataset (real images to calibrate and check on)")
    if "test" in args.calibration_split.lower():
        raise DatasetError(
            f"refusing to calibrate on split {args.calibration_split!r}: it looks like a test split "
            "(use held-out data, e.g. --calibration-split validation)"
        )
    config = EnsembleConfig.from_json_file(str(resolve_file(args.model, CONFIG_NAME)))
    split, rows = held_out_rows(
        args.model, args.calibration_dataset, args.calibration_split, args.calibration_dataset_config
    )
    data = load_eval_split(
        args.calibration_dataset,
        config,
        split=split,
        dataset_config=args.calibration_dataset_config,
        max_samples=args.calibration_samples + (args.held_out_samples or DEFAULT_HELD_OUT),
        rows=rows,
    )
    calibration = calibration_from_split(data, config, args.calibration_samples, args.held_out_samples)
    dataset = public_dataset(args.calibration_dataset)  # export_report.json and the card name no machine path
    calibration.source = (
        f"{dataset}:{args.calibration_split}"
        if rows is None
        else f"{dataset}:validation (the run's carve of {split!r})"  # the carve, not the split it was taken from
    )
    print(
        f"int8: {len(calibration.calibration)} calibration and {len(calibration.held_out)} held-out images of "
        f"{calibration.source}",
        file=sys.stderr,
    )
    return calibration
