"""Every request the cloud can be sent gets an answer it means: logits, or an expected status with a short message.

Hypothesis generates requests, from random bytes to valid requests (plain and in every defended form) with one or
more things changed: names, versions, ids, datatypes, shapes (negative, int64-overflowing, a hundred dimensions),
byte lengths, parameters, NaN and infinite values. They go to the cloud's `answer` in-process, which is everything
the cloud does with a request short of gRPC; a handful of the hostile ones then go through a real `splitleak cloud`.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitleak.cloud import server
from splitleak.core import codec, defences, manifest, serving, transport
from splitleak.core.process import start_cloud, stop
from splitleak.protos import inference_pb2 as pb

MODEL = manifest.load()  # the shipped ResNet-20: no training, no data set needed
EXPECTED = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
STREAM = f"/{transport.SERVICE_NAME}/ModelStreamInfer"


@pytest.fixture(scope="module")
def service() -> server.InferenceService:
    return server.InferenceService(server.load_tails([MODEL.root]))


def answered_as_meant(service: server.InferenceService, raw: bytes) -> str:
    """The status name of the cloud's answer to `raw`, after checking that the answer is one it means."""
    try:
        response = service.answer(raw)
    except server.InferError as e:
        assert e.code.name in EXPECTED, e.message
        assert len(e.message) <= serving.MAX_MESSAGE_CHARS and "\n" not in e.message
        assert len(e.request_id) <= server.MAX_ID_CHARS
        return e.code.name
    logits = codec.decode_response(response)["logits"]
    assert logits.shape[1] == len(MODEL.classes) and np.isfinite(logits).all()
    return "OK"


# Valid requests, in each form a device sends.

FORMS = ("none", "fp16", "quantise", "quantise-channel", "topk")


@st.composite
def valid_requests(draw) -> pb.ModelInferRequest:
    split = MODEL.splits[draw(st.sampled_from(sorted(MODEL.splits)))]
    batch = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    activation = rng.normal(0, 1, (batch, *split.activation_shape)).astype(np.float32)
    form = draw(st.sampled_from(FORMS))
    strength = {"quantise": 4.0, "quantise-channel": 8.0, "topk": 0.5}.get(form)
    tensors, parameters = defences.build(form, strength=strength, split=split).apply(activation, rng)
    return codec.encode_request(
        MODEL.served_name(split.name), tensors, request_id=str(draw(st.integers(0, 999))), parameters=parameters
    )


# What a hostile client changes in one.

names = st.one_of(
    st.sampled_from([*defences.INPUTS, "logits", "", "image"]),
    st.text(max_size=30),
    st.integers(100, 20_000).map(lambda n: "x" * n),
)
dims = st.one_of(
    st.integers(0, 70),
    st.integers(-(2**63), -1),
    st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1]),
)
shapes = st.one_of(st.lists(dims, max_size=6), st.integers(60, 120).map(lambda n: [1] * n))
values = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=20), names
)


def set_values(request: pb.ModelInferRequest, value: float, count: int) -> None:
    """Write `value` into `count` elements of the first float input (NaN, infinities, overflowing magnitudes)."""
    for i, tensor in enumerate(request.inputs):
        if tensor.datatype in ("FP32", "FP16") and i < len(request.raw_input_contents):
            dtype, raw = codec.DATATYPES[tensor.datatype], request.raw_input_contents[i]
            array = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize).copy()
            with np.errstate(over="ignore"):  # 3e38 is infinite in FP16: one more way to send an infinity
                array[: min(count, array.size)] = value
            request.raw_input_contents[i] = array.tobytes() + raw[array.nbytes :]
            return


@st.composite
def mutations(draw, request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    n = len(request.inputs)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(MUTATIONS))
        i = draw(st.integers(0, max(n - 1, 0)))
        if what == "model_name":
            request.model_name = draw(names)
        elif what == "model_version":
            request.model_version = draw(st.sampled_from(["1", "2", "-1", ""]) | st.text(max_size=10))
        elif what == "id":
            request.id = draw(st.sampled_from([300, 5000]).map(lambda k: "i" * k) | st.text(max_size=10))
        elif what == "input_name" and n:
            request.inputs[i].name = draw(names)
        elif what == "datatype" and n:
            request.inputs[i].datatype = draw(st.sampled_from([*codec.DATATYPES, "FP8", "", "fp32"]))
        elif what == "shape" and n:
            request.inputs[i].shape[:] = draw(shapes)
        elif what == "dimension" and n and request.inputs[i].shape:
            shape = request.inputs[i].shape
            shape[draw(st.integers(0, len(shape) - 1))] = draw(dims)
        elif what == "bytes" and i < len(request.raw_input_contents):
            raw = request.raw_input_contents[i]
            cut = draw(st.integers(-len(raw), 64))
            request.raw_input_contents[i] = raw[:cut] if cut < 0 else raw + bytes(cut)
        elif what == "drop_raw" and request.raw_input_contents:
            del request.raw_input_contents[-1]
        elif what == "extra_input":
            request.inputs.add(name=draw(names), datatype="FP32", shape=draw(shapes))
            if draw(st.booleans()):
                request.raw_input_contents.append(bytes(draw(st.integers(0, 64))))
        elif what == "parameter":
            key = draw(st.sampled_from(["bits", "frame_id", "split_point", "defence"]) | st.text(max_size=10))
            codec.set_parameters(request.parameters, {key: draw(values)})
        elif what == "output":
            request.outputs.add(name=draw(names))
        elif what == "values":
            set_values(request, draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38])), draw(st.integers(1, 5)))
    return request


MUTATIONS = ("model_name", "model_version", "id", "input_name", "datatype", "shape", "dimension", "bytes")
MUTATIONS += ("drop_raw", "extra_input", "parameter", "output", "values")
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(request=valid_requests())
def test_every_valid_request_in_every_form_is_answered_with_finite_logits(service, request):
    assert answered_as_meant(service, request.SerializeToString()) == "OK"


@SETTINGS
@given(request=valid_requests().flatmap(mutations))
def test_a_changed_request_gets_logits_or_an_expected_status_with_a_short_message(service, request):
    answered_as_meant(service, request.SerializeToString())


@SETTINGS
@given(
    raw=st.binary(max_size=512)
    | valid_requests()
    .flatmap(lambda r: st.just(r.SerializeToString()))
    .flatmap(lambda raw: st.integers(0, len(raw)).map(lambda cut: raw[:cut] + b"\xff" + raw[cut + 1 :]))
)
def test_random_and_corrupted_bytes_get_an_expected_status_never_an_unknown_one(service, raw):
    answered_as_meant(service, raw)


@settings(max_examples=300, deadline=None)
@given(
    datatype=st.sampled_from(list(codec.DATATYPES)),
    shape=shapes,
    length=st.integers(0, 256),
)
def test_the_codec_refuses_tensors_that_do_not_add_up_with_a_codec_error_only(datatype, shape, length):
    request = pb.ModelInferRequest(raw_input_contents=[bytes(length)])
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    try:
        array = codec.decode_request(request)["x"]
    except codec.CodecError as e:
        assert re.search(r"expected -\d", str(e)) is None  # never a negative byte count
    else:
        assert array.nbytes == length


def message_of(service, request: pb.ModelInferRequest) -> tuple[str, str]:
    try:
        service.answer(request.SerializeToString())
    except server.InferError as e:
        return e.code.name, e.message
    return "OK", ""


def good_request(split: str = "layer3", batch: int = 1) -> pb.ModelInferRequest:
    shape = MODEL.split(split).activation_shape
    return codec.encode_request(MODEL.served_name(split), {"activation": np.ones((batch, *shape), np.float32)})


def test_a_shape_whose_element_count_overflows_int64_is_refused_with_the_expected_shape(service):
    request = good_request()
    request.inputs[0].shape[:] = [1, 2**32, 2**32]
    code, message = message_of(service, request)
    assert code == "INVALID_ARGUMENT"
    assert "expected 73786976294838206464 for FP32 of shape [1, 4294967296, 4294967296]" in message
    assert "shape [-1, 64, 8, 8]" in message


def test_nan_and_infinite_activations_are_refused_saying_why(service):
    for value in (np.nan, np.inf, -np.inf):
        request = good_request()
        set_values(request, value, 3)
        code, message = message_of(service, request)
        assert code == "INVALID_ARGUMENT"
        assert "holds 3 NaN or infinite values" in message and "meaningless" in message


def test_values_that_overflow_the_tail_are_refused_rather_than_answered_with_infinite_logits(service):
    request = good_request()
    set_values(request, 3e38, 4096)
    code, message = message_of(service, request)
    assert code == "INVALID_ARGUMENT" and "overflow the tail" in message


@pytest.mark.parametrize("field", ["model_name", "model_version", "input_name", "datatype", "output"])
def test_a_name_of_a_megabyte_comes_back_cut_to_the_bound(service, field):
    name = "\u00e9" * (1 << 20)
    request = good_request()
    if field == "input_name":
        request.inputs[0].name = name
    elif field == "datatype":
        request.inputs[0].datatype = name
    elif field == "output":
        request.outputs.add(name=name)
    else:
        setattr(request, field, name)
    code, message = message_of(service, request)
    assert code in EXPECTED and len(message) <= serving.MAX_MESSAGE_CHARS
    assert f"({1 << 20} characters, cut to {serving.QUOTE_CHARS})" in message


def test_an_over_long_id_is_refused_and_echoed_cut(service):
    request = good_request()
    request.id = "7" * 10_000
    with pytest.raises(server.InferError) as error:
        service.answer(request.SerializeToString())
    assert error.value.code.name == "INVALID_ARGUMENT" and "at most 256" in error.value.message
    assert error.value.request_id == "7" * server.MAX_ID_CHARS


def test_a_request_of_millions_of_empty_inputs_is_refused_before_it_is_parsed(service):
    one = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(name="a")]).SerializeToString()
    with pytest.raises(server.InferError) as error:
        service.answer(one * 1_000_000)  # 5 MB that protobuf would make a million objects of
    assert error.value.code.name == "INVALID_ARGUMENT" and "more than 64 fields" in error.value.message


# A handful of the hostile requests through a real `splitleak cloud`, unary and on one stream between good frames.


def hostile_requests() -> list[tuple[bytes, str]]:
    """(request, the status it should get)."""
    overflow, negative, nan, long_name, long_id = (good_request() for _ in range(5))
    overflow.inputs[0].shape[:] = [1, 2**32, 2**32]
    negative.inputs[0].shape[1] = -64
    set_values(nan, np.nan, 1)
    long_name.model_name = "n" * (20 << 20)  # 20 MiB
    long_id.id = "i" * 100_000
    over_limit = good_request()
    over_limit.raw_input_contents.append(bytes(transport.MAX_MESSAGE_BYTES))  # in-band: under the transport's limit
    return [
        (b"\xff" * 100, "INVALID_ARGUMENT"),
        *((r.SerializeToString(), "INVALID_ARGUMENT") for r in (overflow, negative, nan, long_id)),
        (long_name.SerializeToString(), "NOT_FOUND"),
        (over_limit.SerializeToString(), "RESOURCE_EXHAUSTED"),
    ]


@pytest.fixture(scope="module")
def cloud_with_log(tmp_path_factory):
    """A real cloud on the shipped model; yields its address and the file its stderr goes to."""
    log_path = tmp_path_factory.mktemp("cloud") / "stderr.txt"
    with open(log_path, "w") as log:
        proc, port = start_cloud([MODEL.root], stderr=log)
    yield f"127.0.0.1:{port}", log_path
    stop(proc)


def big_channel(target: str) -> grpc.Channel:
    """A client that sends what the cloud's transport reads, up to its slack over the limit."""
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", transport.MAX_RECEIVE_BYTES)])


def test_a_stream_answers_every_good_frame_between_bad_ones_and_each_bad_one_in_band(cloud_with_log):
    target, _ = cloud_with_log
    good, hostile = good_request().SerializeToString(), hostile_requests()
    sent = [good]
    for bad, _ in hostile:
        sent += [bad, good]
    with big_channel(target) as channel:
        method = channel.stream_stream(STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = list(method(iter(sent), timeout=120))
    assert len(answers) == len(sent)
    assert all(not a.error_message for a in answers[::2])  # every good frame, however bad the one before
    codes = [a.error_message.split(":", 1)[0] for a in answers[1::2]]
    assert codes == [code for _, code in hostile]
    assert all(a.ByteSize() < serving.MAX_MESSAGE_CHARS + server.MAX_ID_CHARS + 64 for a in answers[1::2])


def test_hostile_unary_requests_get_expected_statuses_short_messages_and_one_log_line_each(cloud_with_log):
    target, log_path = cloud_with_log
    before, hostile = log_path.read_text().count(" ModelInfer "), hostile_requests()
    with big_channel(target) as channel:
        infer = channel.unary_unary(f"/{transport.SERVICE_NAME}/ModelInfer")
        statuses = []
        for raw, _ in hostile:
            with pytest.raises(grpc.RpcError) as error:
                infer(raw, timeout=60)
            statuses.append(error.value.code().name)
            assert len(error.value.details()) <= serving.MAX_MESSAGE_CHARS
        assert infer(good_request().SerializeToString(), timeout=60)  # and still serving
    assert statuses == [code for _, code in hostile]
    lines = [line for line in log_path.read_text().splitlines() if " ModelInfer " in line][before:]
    assert len(lines) == len(statuses) and all(len(line) <= serving.MAX_LOG_CHARS + len("cloud: ") for line in lines)


def test_health_and_metadata_requests_that_are_not_one_or_too_large_are_invalid_argument(cloud_with_log):
    target, _ = cloud_with_log
    with big_channel(target) as channel:
        for method, raw, says in (
            ("ServerLive", b"\xff\xff", "not a ServerLiveRequest"),
            ("ModelMetadata", pb.ModelMetadataRequest(name="x" * 100_000).SerializeToString(), "at most 65536"),
        ):
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary(f"/{transport.SERVICE_NAME}/{method}")(raw, timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in error.value.details()
