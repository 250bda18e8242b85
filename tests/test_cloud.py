"""The cloud checks every request, answers bad ones with a status that says what was expected, and keeps serving."""

import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitleak.core import codec, manifest, transport
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc


@pytest.fixture
def stub(shipped_cloud):
    with transport.channel(f"127.0.0.1:{shipped_cloud}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def model(shipped_model_dir):
    m = manifest.load(shipped_model_dir)
    return m.served_name("layer2"), m.split("layer2").activation_shape  # (32, 16, 16)


def good_request(model, batch=2):
    name, shape = model
    return codec.encode_request(name, {"activation": np.ones((batch, *shape), np.float32)})


def assert_status(stub, request, code, message):
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    assert error.value.code() == code
    assert message in error.value.details()


def test_a_good_request_is_answered_with_logits(stub, model):
    response = stub.ModelInfer(good_request(model, batch=3), timeout=10)
    logits = codec.decode_response(response)["logits"]
    assert logits.shape == (3, 10) and np.isfinite(logits).all()
    assert {"cloud_recv_ns", "cloud_send_ns", "cloud_compute_ms"} <= set(codec.get_parameters(response.parameters))


def test_malformed_requests_get_clear_statuses_and_the_cloud_keeps_serving(stub, model):
    name, shape = model
    assert_status(
        stub,
        codec.encode_request("no-such-model", {"activation": np.ones((1, *shape), np.float32)}),
        grpc.StatusCode.NOT_FOUND,
        "model 'no-such-model' is not served here",
    )
    assert_status(
        stub,
        codec.encode_request(name, {"activation": np.ones((1, *shape), np.float64)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "got datatype 'FP64'; expected one input 'activation' of datatype FP32 and shape [-1, 32, 16, 16]",
    )
    assert_status(
        stub,
        codec.encode_request(name, {"activation": np.ones((1, 32, 8, 8), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "got shape [1, 32, 8, 8]",
    )
    assert_status(
        stub,
        codec.encode_request(name, {"image": np.ones((1, *shape), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "got inputs ['image']",
    )
    short = good_request(model)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    assert_status(stub, short, grpc.StatusCode.INVALID_ARGUMENT, "65532 bytes, expected 65536")
    too_many = good_request(model)
    too_many.inputs[0].shape[0] = 1000
    assert_status(stub, too_many, grpc.StatusCode.RESOURCE_EXHAUSTED, "batch of 1000 is over the limit")
    huge = codec.encode_request(name, {"activation": np.zeros((130, *shape), np.float32)})
    huge.raw_input_contents.append(b"\0" * transport.MAX_MESSAGE_BYTES)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(huge, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wrong_version = good_request(model)
    wrong_version.model_version = "7"
    assert_status(stub, wrong_version, grpc.StatusCode.NOT_FOUND, "version '7'")
    # Still serving after all that.
    assert codec.decode_response(stub.ModelInfer(good_request(model), timeout=10))["logits"].shape == (2, 10)


def test_errors_on_a_stream_are_answered_in_band_and_the_stream_goes_on(stub, model):
    bad = codec.encode_request("no-such-model", {"activation": np.ones((1, 1), np.float32)}, request_id="1")
    good = good_request(model)
    good.id = "2"
    responses = list(stub.ModelStreamInfer(iter([bad, good]), timeout=30))
    assert responses[0].error_message.startswith("NOT_FOUND: model 'no-such-model'")
    assert responses[0].infer_response.id == "1"
    assert responses[1].error_message == "" and responses[1].infer_response.id == "2"


def test_metadata_index_and_health_describe_what_is_served(stub, model, shipped_cloud):
    name, shape = model
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
    assert list(meta.inputs[0].shape) == [-1, *shape] and meta.inputs[0].datatype == "FP32"
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    assert {m.name for m in index.models} == {
        f"{name.rsplit('.', 1)[0]}.{s}" for s in ("stem", "layer1", "layer2", "layer3")
    }
    assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=name)).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    assert "streaming" in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
    with transport.channel(f"127.0.0.1:{shipped_cloud}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=transport.SERVICE_NAME), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_the_cloud_finishes_in_flight_work_on_sigterm(shipped_model_dir):
    import time

    from splitleak.core.process import start_cloud

    m = manifest.load(shipped_model_dir)
    proc, port = start_cloud([shipped_model_dir])
    with transport.channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        # 256 frames through the whole tail from the stem: long enough to be mid-computation at the signal.
        big = codec.encode_request(
            m.served_name("stem"), {"activation": np.ones((256, *m.split("stem").activation_shape), np.float32)}
        )
        future = stub.ModelInfer.future(big, timeout=60)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert codec.decode_response(future.result())["logits"].shape == (256, 10)
    assert proc.wait(30) == 0


def test_the_cloud_refuses_a_folder_that_is_not_an_exported_model(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "splitleak.cli", "cloud", "--port", "0", "--models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "no manifest.json" in done.stderr
