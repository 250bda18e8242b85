"""The tensor codec: numpy arrays to and from Open Inference Protocol messages, with `raw_input_contents`.

Tensors travel as raw little-endian bytes, row-major (the OIP's `raw_input_contents` / `raw_output_contents`),
which costs one copy each way instead of the per-element encoding of the typed `contents` fields.

A defended activation may travel in another form (FP16, UINT8 levels with `scale` and `zero_point` inputs, or some
channels with a `channels` input); splitleak.core.defences writes and reads those forms, this module only moves tensors.

Split-specific facts ride in the request and response `parameters` maps, so a stock OIP client or server ignores them:

| key | where | type | meaning |
|---|---|---|---|
| `split_point` | request | string | the head's last block |
| `frame_id` | request | int64 | the frame's index in the data set the device reads (for scoring) |
| `device_send_ns` | request | int64 | wall clock (ns) when the device put the request on the link |
| `defence`, `defence_strength` | request | string, double | the defence the device applied (splitleak.core.defences) |
| `bits` | request | int64 | with quantised UINT8 levels: bits per level, packed below 8 (splitleak.core.defences) |
| `cloud_recv_ns`, `cloud_send_ns` | response | int64 | wall clock (ns): cloud got the request / sent the answer |
| `cloud_compute_ms` | response | double | time the cloud spent validating and running the tail |
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from splitleak.protos import inference_pb2 as pb

# OIP datatype names (https://github.com/kserve/open-inference-protocol, "Tensor Data Types") to numpy.
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype).newbyteorder("<")
    for name, dtype in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
_NAMES = {dtype.base: name for name, dtype in DATATYPES.items()}
# numpy's own limit on an array's dimensions; checked before the shape is multiplied out, so a hostile shape of a
# million dimensions costs nothing.
MAX_DIMS = 64

ParamValue = bool | int | float | str


class CodecError(ValueError):
    """A message does not hold the tensors it claims to: the caller answers INVALID_ARGUMENT."""


def datatype_of(array: np.ndarray) -> str:
    try:
        return _NAMES[array.dtype.base.newbyteorder("=")]
    except KeyError:
        raise CodecError(f"no OIP datatype for numpy {array.dtype}") from None


def set_parameters(target, values: Mapping[str, ParamValue]) -> None:
    """Fill an OIP `parameters` map from plain Python values."""
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = str(value)


def get_parameters(source) -> dict[str, ParamValue]:
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in source.items()
        if value.WhichOneof("parameter_choice")
    }


def encode_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    *,
    request_id: str = "",
    parameters: Mapping[str, ParamValue] | None = None,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model_name, id=request_id)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    set_parameters(request.parameters, parameters or {})
    return request


def decode_request(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    return _decode(request.inputs, request.raw_input_contents, "input")


def encode_response(
    request: pb.ModelInferRequest, outputs: Mapping[str, np.ndarray], parameters: Mapping[str, ParamValue] | None = None
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    set_parameters(response.parameters, parameters or {})
    return response


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return _decode(response.outputs, response.raw_output_contents, "output")


def _decode(tensors, raw, kind: str) -> dict[str, np.ndarray]:
    if raw and len(raw) != len(tensors):
        raise CodecError(f"{len(tensors)} {kind} tensors but {len(raw)} raw contents; expected one per tensor")
    arrays = {}
    for i, tensor in enumerate(tensors):
        if tensor.datatype not in DATATYPES:
            raise CodecError(
                f"{kind} {tensor.name!r}: unknown datatype {tensor.datatype!r}; expected one of {', '.join(DATATYPES)}"
            )
        if len(tensor.shape) > MAX_DIMS:
            raise CodecError(f"{kind} {tensor.name!r}: {len(tensor.shape)} dimensions; at most {MAX_DIMS}")
        if any(d < 0 for d in tensor.shape):
            raise CodecError(f"{kind} {tensor.name!r}: negative dimension in shape {list(tensor.shape)}")
        dtype = DATATYPES[tensor.datatype]
        if not raw:
            raise CodecError(f"{kind} {tensor.name!r}: tensors must be sent in raw_{kind}_contents")
        # Python ints: an element count past int64 (a shape [1, 2**32, 2**32]) is just a number of bytes not sent.
        expected = math.prod(tensor.shape) * dtype.itemsize
        if len(raw[i]) != expected:
            raise CodecError(
                f"{kind} {tensor.name!r}: {len(raw[i])} bytes, expected {expected} "
                f"for {tensor.datatype} of shape {list(tensor.shape)}"
            )
        try:
            arrays[tensor.name] = np.frombuffer(raw[i], dtype).reshape(tensor.shape)
        except ValueError as e:  # an empty tensor whose other dimensions numpy cannot hold: [0, 2**62, 2**62]
            raise CodecError(f"{kind} {tensor.name!r}: shape {list(tensor.shape)}: {e}") from None
    return arrays
