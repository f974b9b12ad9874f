"""The Open Inference Protocol (v2) tensors: JSON and the binary tensor extension, both directions.

Pure Python + numpy, no web framework. A request body is JSON, or (binary extension) a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian bytes of every input whose
``parameters.binary_data_size`` is set, in input order. Outputs are returned in binary when the request asks
(``parameters.binary_data_output`` or an output's ``parameters.binary_data``), else as JSON lists. Every
malformed request raises :class:`~qdeploy.serve.errors.RequestError` naming the problem.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .core import check_shape, dims_text
from .errors import BodyTooLarge, RequestError, UnsupportedEncoding

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
DTYPE_NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}


def datatype(dtype: np.dtype) -> str:
    return DTYPE_NAMES.get(np.dtype(dtype), str(dtype))


@dataclass
class InferRequest:
    """A decoded request: the feed, the request id, the outputs asked for and which go back in binary."""

    feed: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] = field(default_factory=list)
    binary: set[str] = field(default_factory=set)


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate), never inflating past ``limit`` bytes."""
    if not encoding or encoding.lower() == "identity":
        return body
    enc = encoding.lower()
    if enc not in ("gzip", "deflate"):
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"the body is not valid {enc} data ({exc})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise BodyTooLarge(f"the decompressed body is larger than the {limit}-byte limit")
    return out


def parse_infer(body: bytes, header_length: str | None, inputs: list[tuple[str, tuple, np.dtype]],
                output_names: list[str]) -> InferRequest:
    """Decode a v2 inference request against the model's ``inputs`` (name, shape, dtype) and outputs."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < n <= len(body):
            raise RequestError(f"Inference-Header-Content-Length {n} does not fit the {len(body)}-byte body")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(req, dict):
        raise RequestError("the request body must be a JSON object with an 'inputs' list")
    tensors = req.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise RequestError("the request has no 'inputs' list")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be a JSON object")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("'id' must be a string")
    specs = {name: (shape, dtype) for name, shape, dtype in inputs}
    feed: dict[str, np.ndarray] = {}
    offset = 0
    for t in tensors:
        if not isinstance(t, dict):
            raise RequestError("each input must be a JSON object with name, shape, datatype and data")
        name = t.get("name")
        if name not in specs:
            raise RequestError(f"unknown input {name!r}; the model takes {list(specs)}")
        if name in feed:
            raise RequestError(f"input {name!r} is given twice")
        declared, dtype = specs[name]
        want = datatype(dtype)
        if t.get("datatype") != want:
            raise RequestError(f"input {name!r} has datatype {t.get('datatype')!r}; the model takes {want}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
        check_shape(name, tuple(shape), declared)
        count = int(np.prod(shape))
        tparams = t.get("parameters") or {}
        size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise RequestError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise RequestError(f"input {name!r}: binary_data_size {size} bytes does not match shape {shape} "
                                   f"of {want} ({count * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise RequestError(f"input {name!r}: the binary section ends before its {size} bytes")
            arr = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
            offset += size
        else:
            if "data" not in t:
                raise RequestError(f"input {name!r} has no 'data' (and no binary_data_size)")
            arr = _json_array(name, t["data"], dtype, shape, count)
        feed[name] = arr
    missing = [n for n in specs if n not in feed]
    if missing:
        raise RequestError(f"missing input(s) {missing}; the model takes {list(specs)}")
    if offset != len(binary):
        raise RequestError(f"the binary section has {len(binary) - offset} bytes no input claims")
    return InferRequest(feed, rid, *_outputs(req, params, output_names))


def _json_array(name: str, data: Any, dtype: np.dtype, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: 'data' must be a list of numbers")
    try:
        flat = np.asarray(data, dtype=dtype) if dtype != np.bool_ else np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"input {name!r}: 'data' is not a list of {datatype(dtype)} numbers ({exc})") from None
    if dtype == np.bool_ and flat.dtype != np.bool_ and flat.size:
        raise RequestError(f"input {name!r}: 'data' must hold true/false for BOOL")
    if flat.dtype == object:
        raise RequestError(f"input {name!r}: 'data' is not a list of numbers")
    if flat.size != count:
        raise RequestError(f"input {name!r}: 'data' has {flat.size} values; shape {shape} needs {count}")
    return flat.astype(dtype, copy=False).reshape(shape)


def _outputs(req: dict, params: dict, output_names: list[str]) -> tuple[list[str], set[str]]:
    all_binary = bool(params.get("binary_data_output", False))
    wanted = req.get("outputs")
    if wanted is None:
        return list(output_names), set(output_names) if all_binary else set()
    if not isinstance(wanted, list):
        raise RequestError("'outputs' must be a list")
    names, binary = [], set()
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in output_names:
            raise RequestError(f"unknown output {name!r}; the model has {output_names}")
        names.append(name)
        op = o.get("parameters") or {}
        if (op.get("binary_data", all_binary) if isinstance(op, dict) else all_binary):
            binary.add(name)
    return names, binary


def encode_infer(model: str, version: str, request: InferRequest, outputs: Mapping[str, np.ndarray],
                 parameters: dict[str, Any]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    tensors, blobs = [], []
    for name in request.outputs:
        arr = np.ascontiguousarray(outputs[name])
        t: dict[str, Any] = {"name": name, "datatype": datatype(arr.dtype), "shape": list(arr.shape)}
        if name in request.binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.ravel().tolist()
        tensors.append(t)
    resp: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None:
        resp["id"] = request.id
    resp["parameters"] = parameters
    resp["outputs"] = tensors
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def tensor_metadata(items: list[tuple[str, tuple, np.dtype]]) -> list[dict[str, Any]]:
    return [{"name": n, "datatype": datatype(d), "shape": json.loads(dims_text(s))} for n, s, d in items]
