"""Open Inference Protocol v2 routes (KServe / Triton REST), as ``tritonclient.http`` calls them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from freetickets_hub import __version__

from .errors import InvalidInput
from .service import Service
from .tensors import HEADER_LENGTH, decode_infer_request, encode_infer_response

__all__ = ["router"]

router = APIRouter(tags=["Open Inference Protocol v2"])


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": "freetickets-hub", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    service = _service(request)
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    engine = _service(request).check_model(name, version)
    return {
        "name": name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx" if engine.backend == "onnx" else "pytorch_torch",
        "inputs": [engine.input.to_dict()],
        "outputs": [spec.to_dict() for spec in engine.outputs],
    }


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    service = _service(request)
    service.check_model(name, version)  # 404 for another model, 503 while loading
    return JSONResponse({"name": name, "ready": service.ready}, status_code=200 if service.ready else 503)


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    """Inference on ``pixel_values``: JSON, or the binary tensor extension (``Inference-Header-Content-Length``)."""
    service = _service(request)
    engine = service.check_model(name, version)
    encoding = request.headers.get("content-encoding", "identity")
    if encoding != "identity":
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    service.check_capacity()
    body = await request.body()
    decoded = decode_infer_request(
        body, request.headers.get(HEADER_LENGTH), engine.input, engine.output_names, service.settings.max_batch_size
    )
    result = await service.infer(decoded.pixel_values)
    specs = {spec.name: spec for spec in engine.outputs}
    payload, headers = encode_infer_response(name, decoded, result.outputs, specs)
    return Response(payload, headers=headers)
