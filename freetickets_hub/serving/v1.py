"""The friendly dialect: ``POST /v1/predict`` (image files or base64), ``/v1/metadata``, ``/metrics``, the page."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile

from .errors import InvalidInput
from .predict import decode_base64_images, parse_top_k, records
from .service import Service
from .tensors import parse_json

__all__ = ["router"]

router = APIRouter()
# the page loads nothing from anywhere: inline script and style only, and fetches only this server
_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'"
)


def _service(request: Request) -> Service:
    return request.app.state.service


@router.post(
    "/v1/predict",
    tags=["predict"],
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"images": {"type": "array", "items": {"type": "string"}}},
                    }
                },
            }
        }
    },
)
async def predict(request: Request, top_k: str | None = None) -> JSONResponse:
    """Classify images with uncertainty: multipart field ``files`` (one or more) or JSON ``{"images": [base64, ...]}``.

    Each image gets ``label``, ``confidence``, ``top_k`` (``?top_k=``, default 5), ``entropy``,
    ``expected_entropy``, ``mutual_information``, ``disagreement``, ``member_votes`` and, when the
    model carries a selective-prediction calibration, ``abstain`` and ``prediction_set``.
    """
    service = _service(request)
    engine = service.require_engine()
    k = parse_top_k(top_k, engine.config.num_classes)
    service.check_capacity()
    limit = service.settings.max_batch_size
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        blobs = await _uploaded(request, limit, service.settings.max_body_bytes)
    elif content_type.startswith("application/json"):
        payload = parse_json(await request.body(), where="the body is not valid JSON")
        blobs = decode_base64_images(payload)
    else:
        raise InvalidInput(
            f"unsupported Content-Type {content_type!r}: send multipart/form-data (field 'files') or "
            'application/json {"images": [base64, ...]}'
        )
    if len(blobs) > limit:
        raise InvalidInput(f"{len(blobs)} images in one request; the limit is {limit} (--max-batch-size)")
    reservation = service.reserve(len(blobs))  # decoding counts against --max-queue: a burst is shed first
    try:
        pixel_values = await service.decode(blobs)
        result = await service.infer(pixel_values, reservation)
    finally:
        service.release(reservation)
    rows = records(result.outputs, engine.config, k)
    abstained = sum(bool(row.get("abstain")) for row in rows)
    if abstained:
        service.metrics.abstentions.inc(abstained)
    return JSONResponse({"model": service.name, "predictions": rows})


async def _uploaded(request: Request, limit: int, max_bytes: int) -> list[tuple[str, bytes]]:
    async with request.form(max_files=limit + 1, max_fields=limit + 1, max_part_size=max_bytes) as form:
        files = form.getlist("files")
        if not files:
            raise InvalidInput(f"no images: send one or more files in the multipart field 'files' (got {list(form)})")
        if len(files) > limit:
            raise InvalidInput(f"{len(files)} images in one request; the limit is {limit} (--max-batch-size)")
        blobs = []
        for i, item in enumerate(files):
            if not isinstance(item, UploadFile):
                raise InvalidInput(f"files[{i}] is a text field, not a file upload")
            blobs.append((item.filename or f"files[{i}]", await item.read()))
        return blobs


@router.get("/v1/metadata", tags=["predict"])
async def metadata(request: Request) -> dict[str, Any]:
    """Labels, members, sparsity, temperature and its fit, abstention settings, backend, active providers, versions."""
    return _service(request).metadata()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    html = resources.files("freetickets_hub.serving").joinpath("page.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": _PAGE_POLICY})
