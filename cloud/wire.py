"""A look at a ModelInferRequest's structure before protobuf parses it, so that parsing costs what the bytes cost.

protobuf turns every element of a repeated field into an object: 64 MiB of empty `inputs` (5 bytes each) parse into
13 million of them, 1.3 GB and 3.5 s in the upb runtime (measured), and a packed shape of one-byte dimensions
grows eightfold. A request the cloud can answer has a handful of each (about 20 fields at the top, a few in each
tensor), so this walks the field headers of the wire format (protobuf.dev/programming-guides/encoding) and refuses,
before any parsing, a message with more than that in any repeated place. Length-delimited fields, the tensors among
them, are stepped over whole: the walk reads at most a few thousand headers, whatever the message's size.
"""

from __future__ import annotations

# Field numbers in protos/inference.proto.
_MODEL_NAME, _INPUTS, _OUTPUTS = 1, 5, 6  # of ModelInferRequest
_SHAPE, _CONTENTS = 3, 5  # of InferInputTensor

MAX_FIELDS = 64  # at the top of a request, and in each tensor: parameters, inputs, raw contents, dimensions
MAX_NAME_BYTES = 1024  # longer than any model name served: the cloud reads no more of one to route it
MAX_SHAPE_BYTES = 64 * 10  # a packed shape of 64 dimensions (codec.MAX_DIMS), each a varint of at most 10 bytes


class WireError(ValueError):
    """The message is not one the cloud will parse; the message says why."""


def check_request(raw: bytes) -> bytes:
    """Raise WireError if `raw` is malformed or holds more repeated elements than a request the cloud answers; the
    model's name as it was sent (UTF-8), so that the cloud can pick where to answer it before parsing it, or b"" for
    a name longer than MAX_NAME_BYTES, which names no model served."""
    name = b""
    for number, start, end in _fields(raw, 0, len(raw), "the request"):
        if number == _MODEL_NAME:  # the last one counts, as protobuf reads a field sent twice
            name = raw[start:end] if end - start <= MAX_NAME_BYTES else b""
        elif number == _INPUTS:
            for inner, start_, end_ in _fields(raw, start, end, "an input tensor"):
                if inner == _SHAPE and end_ - start_ > MAX_SHAPE_BYTES:
                    raise WireError(f"an input's shape takes {end_ - start_} bytes; {MAX_SHAPE_BYTES} hold any shape")
                if inner == _CONTENTS and end_ > start_:
                    raise WireError("typed contents are not read here; send each tensor in raw_input_contents")
        elif number == _OUTPUTS:
            _fields(raw, start, end, "a requested output")
    return name


def _fields(raw: bytes, start: int, end: int, what: str) -> list[tuple[int, int, int]]:
    """(field number, start, end of its value) for each field in raw[start:end]."""
    fields = []
    i = start
    while i < end:
        if len(fields) == MAX_FIELDS:
            raise WireError(f"{what} has more than {MAX_FIELDS} fields; one the cloud can answer has a few")
        key = raw[i]
        if key < 0x80:  # a one-byte key, as every field of a request has: read here, a third of the walk's time
            i += 1
        else:
            key, i = _varint(raw, i, end)
        kind = key & 7
        if kind == 0:
            _, j = _varint(raw, i, end)
        elif kind == 1:
            j = i + 8
        elif kind == 2:
            length, i = _varint(raw, i, end)
            j = i + length
        elif kind == 5:
            j = i + 4
        else:
            raise WireError(f"malformed: {what} has a field of wire type {kind}")
        if j > end:
            raise WireError(f"malformed: a field runs past the end of {what}")
        fields.append((key >> 3, i, j))
        i = j
    return fields


def _varint(raw: bytes, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while i < end and shift < 70:
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
    raise WireError("malformed: a number runs past the end of the message")
