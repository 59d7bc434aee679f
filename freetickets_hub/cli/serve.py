"""``freetickets serve``: predictions over HTTP from any engine (onnx | openvino | torch)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the verb and its flags."""
    from freetickets_hub.serving.engine import BACKENDS  # numpy only: the parser stays torch-free

    p = verbs.add_parser("serve", help="serve predictions over HTTP: /v1/predict, Open Inference Protocol v2, page")
    p.add_argument("model", help="a saved ensemble folder or a Hub repo id (offline cache honoured)")
    p.add_argument(
        "--backend", choices=BACKENDS, default="onnx",
        help="onnx (default: ONNX Runtime, no torch), openvino (the same graph on OpenVINO, no torch) or torch",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most images per engine call and request")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill (default: 5)")
    p.add_argument("--max-queue", type=int, default=256, help="images in the queue or engine before 503 (default: 256)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, MiB; more gets 413")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model and batcher")
    p.add_argument("--name", default=None, help="the model's name in /v2/models/{name} (default: last part of MODEL)")
    p.add_argument(
        "--variant", choices=("fp32", "int8"), default="fp32",
        help="the graph (onnx, openvino): fp32 (onnx/model.onnx) or int8 (onnx/model.int8.onnx, export --quantize)",
    )  # fmt: skip
    p.add_argument("--keep-alive-s", type=int, default=5, help="close idle connections after this (default: 5)")
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="408 when a body takes longer (default: 30)")
    p.add_argument(
        "--docs", action="store_true", help="serve Swagger UI at /docs and ReDoc at /redoc (they load from a CDN)"
    )
    p.add_argument("--drain-timeout-s", type=float, default=30.0, help="on SIGTERM, exit within this (default: 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from freetickets_hub.serving.engine import check_backend_files, check_graph
    from freetickets_hub.serving.server import run_server
    from freetickets_hub.serving.service import ServeSettings

    settings = ServeSettings(
        args.model,
        backend=args.backend,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        workers=args.workers,
        name=args.name,
        variant=args.variant,
        keep_alive_s=args.keep_alive_s,
        body_timeout_s=args.body_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        docs=args.docs,
    )
    check_backend_files(
        settings.model, settings.backend, settings.variant
    )  # one line naming the fix, before any process
    if settings.backend == "onnx":
        check_graph(settings.model, settings.variant)  # a corrupt graph never binds the port (openvino: in its loader)
    return run_server(settings)
