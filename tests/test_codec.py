"""The tensor codec round-trips every OIP datatype and shape, and refuses tensors that don't add up."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from splitleak.core import codec

dtypes = st.sampled_from(
    [
        np.dtype(d)
        for d in (
            np.bool_,
            np.uint8,
            np.int8,
            np.int16,
            np.int32,
            np.int64,
            np.uint16,
            np.uint32,
            np.uint64,
            np.float16,
            np.float32,
            np.float64,
        )
    ]
)


@settings(max_examples=200, deadline=None)
@given(array=dtypes.flatmap(lambda d: arrays(d, array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6))))
def test_arrays_round_trip_through_a_request_and_a_response(array):
    request = codec.encode_request("m", {"x": array}, request_id="7", parameters={"frame_id": 3, "split": "s"})
    wire = type(request).FromString(request.SerializeToString())
    decoded = codec.decode_request(wire)["x"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    response = codec.encode_response(wire, {"y": array}, {"cloud_compute_ms": 1.5})
    np.testing.assert_array_equal(codec.decode_response(response)["y"], array)
    assert codec.get_parameters(wire.parameters) == {"frame_id": 3, "split": "s"}
    assert response.id == "7"


def test_parameters_keep_their_python_types():
    request = codec.encode_request("m", {}, parameters={"a": True, "b": 2, "c": 0.5, "d": "x"})
    assert codec.get_parameters(request.parameters) == {"a": True, "b": 2, "c": 0.5, "d": "x"}


def test_wrong_byte_length_says_what_was_expected():
    request = codec.encode_request("m", {"x": np.zeros((2, 3), np.float32)})
    request.raw_input_contents[0] = b"\0" * 20
    with pytest.raises(codec.CodecError, match="20 bytes, expected 24 for FP32 of shape \\[2, 3\\]"):
        codec.decode_request(request)


def test_unknown_datatype_and_missing_raw_contents_are_refused():
    request = codec.encode_request("m", {"x": np.zeros(3, np.float32)})
    request.inputs[0].datatype = "FP8"
    with pytest.raises(codec.CodecError, match="unknown datatype 'FP8'"):
        codec.decode_request(request)
    request = codec.encode_request("m", {"x": np.zeros(3, np.float32)})
    del request.raw_input_contents[:]
    with pytest.raises(codec.CodecError, match="raw_input_contents"):
        codec.decode_request(request)
