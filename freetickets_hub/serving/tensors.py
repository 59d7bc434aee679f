"""Open Inference Protocol v2 tensors: decode a request (JSON or the binary tensor extension), encode a reply.

Binary tensor extension: the body is a JSON header of ``Inference-Header-Content-Length`` bytes
followed by the raw tensors, in input order, each ``parameters.binary_data_size`` bytes long,
little-endian, row-major. Without that header the whole body is JSON, whatever its Content-Type
(``tritonclient``'s aio client sends JSON as ``application/octet-stream``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import TensorSpec
from .errors import InvalidInput

__all__ = ["HEADER_LENGTH", "InferRequest", "decode_infer_request", "encode_infer_response", "parse_json"]

HEADER_LENGTH = "Inference-Header-Content-Length"
_NUMPY = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1", "BOOL": "?"}


@dataclass
class InferRequest:
    """A decoded ``/infer`` request: its id, the input tensor, and the outputs asked for."""

    id: str | None
    pixel_values: np.ndarray
    outputs: list[tuple[str, bool]]  # (name, as binary data), in the order asked


def decode_infer_request(
    body: bytes, header_length: str | None, model_input: TensorSpec, output_names: Sequence[str], max_batch: int
) -> InferRequest:
    """Parse and check an ``/infer`` body against the model's input and outputs.

    Raises:
        InvalidInput: malformed JSON or binary layout, unknown input/output, wrong datatype or shape,
            a batch over ``max_batch``, or non-finite values.
    """
    header, binary = _split(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise InvalidInput("the request needs 'inputs': a list of tensors")
    names = [t.get("name") for t in inputs]
    unknown = [n for n in names if n != model_input.name]
    if unknown or len(inputs) != 1:
        raise InvalidInput(f"unknown or repeated input(s) {names}; the model takes one input {model_input.name!r}")
    tensor = inputs[0]
    shape = _check_shape(tensor, model_input, max_batch)
    if tensor.get("datatype") != model_input.datatype:
        raise InvalidInput(
            f"input {model_input.name!r} must have datatype {model_input.datatype}, got {tensor.get('datatype')!r}"
        )
    parameters = _parameters(tensor, f"input {model_input.name!r}")
    if "shared_memory_region" in parameters:
        raise InvalidInput("shared-memory tensors are not supported: send the data in the request")
    count = math.prod(shape)
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        expected = count * np.dtype(_NUMPY[model_input.datatype]).itemsize
        if size != expected or len(binary) != size:
            raise InvalidInput(
                f"input {model_input.name!r} of shape {shape} needs binary_data_size {expected}; the request "
                f"declares {size!r} and carries {len(binary)} bytes after the JSON header"
            )
        array = np.frombuffer(binary, dtype=_NUMPY[model_input.datatype]).reshape(shape)
    else:
        if binary:
            raise InvalidInput(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
        array = _from_json(tensor.get("data"), shape, model_input)
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InvalidInput(f"input {model_input.name!r} contains {bad} NaN or infinite value(s)")
    request_id = header.get("id")
    return InferRequest(
        None if request_id is None else str(request_id), array, _requested_outputs(header, output_names)
    )


def encode_infer_response(
    model_name: str, request: InferRequest, outputs: dict[str, np.ndarray], specs: dict[str, TensorSpec]
) -> tuple[bytes, dict[str, str]]:
    """The reply body and its headers; binary outputs follow the JSON header (the header names its length)."""
    described, chunks = [], []
    for name, binary in request.outputs:
        value = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": specs[name].datatype, "shape": list(value.shape)}
        if binary:
            raw = value.astype(_NUMPY[specs[name].datatype], copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = value.ravel().tolist()
        described.append(entry)
    reply: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": described}
    if request.id is not None:
        reply["id"] = request.id
    head = json.dumps(reply, separators=(",", ":")).encode()
    if not chunks:
        return head, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        length = len(body)
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
    where = f"the first {HEADER_LENGTH} bytes" if header_length is not None else "the body"
    header = parse_json(body[:length], where=f"{where} must be a JSON inference request")
    if not isinstance(header, dict):
        raise InvalidInput(f"the inference request must be a JSON object, got {type(header).__name__}")
    return header, body[length:]


def _parameters(tensor: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object, got {parameters!r}")
    return parameters


def _check_shape(tensor: dict[str, Any], spec: TensorSpec, max_batch: int) -> list[int]:
    shape = tensor.get("shape")
    expected = ["B" if d == -1 else d for d in spec.shape]
    if (
        not isinstance(shape, list)
        or len(shape) != len(spec.shape)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or any(want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True))
    ):
        raise InvalidInput(f"input {spec.name!r} must have shape {expected}, got {shape!r}")
    if not 1 <= shape[0] <= max_batch:
        raise InvalidInput(f"input {spec.name!r} has batch {shape[0]}; this server takes 1 to {max_batch} per request")
    return shape


def _from_json(data: Any, shape: list[int], spec: TensorSpec) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"input {spec.name!r} needs 'data' (a list of numbers) or binary data")
    try:
        array = np.asarray(data)
    except (TypeError, ValueError, OverflowError) as err:
        raise InvalidInput(f"input {spec.name!r}: 'data' must hold only numbers ({err})") from None
    if array.dtype.kind not in "iuf" or _holds_bool(data):  # strings, null, booleans, integers past int64
        raise InvalidInput(
            f"input {spec.name!r}: 'data' must hold only numbers (no strings, null, booleans or integers "
            f"over 64 bits), got {array.dtype.name} values"
        )
    if array.size != math.prod(shape):
        raise InvalidInput(f"input {spec.name!r} of shape {shape} needs {math.prod(shape)} values, got {array.size}")
    return array.reshape(shape)


def _holds_bool(data: list[Any]) -> bool:
    """Whether a nested list holds a JSON boolean (numpy would read ``true`` as 1 among numbers)."""
    return any(_holds_bool(v) if isinstance(v, list) else isinstance(v, bool) for v in data)


def parse_json(body: bytes, *, where: str) -> Any:
    """``json.loads`` whose every failure (syntax, nesting too deep, an integer too long) is ``InvalidInput``."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInput(f"{where} ({err})") from None
    except RecursionError:
        raise InvalidInput(f"{where} (the JSON is nested too deeply)") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise InvalidInput(f"{where} ({err})") from None


def _requested_outputs(header: dict[str, Any], output_names: Sequence[str]) -> list[tuple[str, bool]]:
    parameters = _parameters(header, "the request")
    default_binary = bool(parameters.get("binary_data_output", False))
    asked = header.get("outputs")
    if asked is None:
        return [(name, default_binary) for name in output_names]
    if not isinstance(asked, list) or not all(isinstance(t, dict) for t in asked):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    chosen = []
    for tensor in asked:
        name = tensor.get("name")
        if name not in output_names:
            raise InvalidInput(f"unknown output {name!r}; the model's outputs are {list(output_names)}")
        options = _parameters(tensor, f"output {name!r}")
        if "classification" in options or "shared_memory_region" in options:
            raise InvalidInput(f"output {name!r}: the classification and shared-memory extensions are not supported")
        chosen.append((name, bool(options.get("binary_data", default_binary))))
    return chosen
