"""The two taps on real processes: device -> proxy -> cloud, and the curious cloud, on loopback."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cloud_limits import OpenStream, connection, good, is_answered, twenty_idle_streams_then_a_device

from splitleak.attacker import proxy
from splitleak.core import capture, codec, serving, transport
from splitleak.core.process import start_cloud, stop
from splitleak.device.head import Head
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

DATASET = "cifar10"


def run_device(port: int, model_dir: Path, out: Path, limit: int) -> dict[int, int]:
    """Run `splitleak device` to completion; returns each frame's prediction."""
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}", "--dataset", DATASET]
    cmd += ["--model-dir", str(model_dir), "--limit", str(limit), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    frames = json.loads(out.read_text())["frames"]
    assert all(f["error"] is None for f in frames)
    return {f["frame"]: f["prediction"] for f in frames}


def head_on_originals(head: Head, got: capture.Capture, frame_ids: np.ndarray) -> np.ndarray:
    """What the device's head computes from the private frames, one frame at a time as the device runs it."""
    x = head.manifest.preprocess(got.originals(frame_ids, head.manifest))
    return np.concatenate([head.run(x[i : i + 1]) for i in range(len(x))])


@pytest.mark.slow
def test_device_through_the_proxy_gets_the_cloud_s_predictions_and_the_capture_holds_every_activation(
    cloud, tiny_model_dir, tmp_path
):
    direct = run_device(cloud, tiny_model_dir, tmp_path / "direct.json", limit=50)
    proc, port = proxy.start_process(f"127.0.0.1:{cloud}", tmp_path / "capture", dataset=DATASET)
    try:
        proxied = run_device(port, tiny_model_dir, tmp_path / "proxied.json", limit=50)
    finally:
        assert stop(proc) == 0  # SIGTERM: the proxy flushes its capture and exits cleanly

    assert proxied == direct and len(direct) == 50
    got = capture.read(tmp_path / "capture")
    head = Head(tiny_model_dir)
    assert got.models() == [head.served_name]
    frame_ids, activations = got.activations(head.served_name)
    assert sorted(frame_ids.tolist()) == sorted(direct)
    assert {r.split_point for r in got.records} == {head.split.name}
    np.testing.assert_array_equal(activations, head_on_originals(head, got, frame_ids))
    # The cloud's answers too: each frame's logits, as the tail computes them from the activation the tap saw.
    answered, logits = got.logits(head.served_name)
    assert answered.tolist() == frame_ids.tolist()
    tail = onnxruntime.InferenceSession(str(head.split.tail), providers=["CPUExecutionProvider"])
    direct_logits = np.concatenate([tail.run(["logits"], {"activation": a[None]})[0] for a in activations])
    np.testing.assert_allclose(logits, direct_logits, rtol=1e-5, atol=1e-5)
    assert {int(f): int(p) for f, p in zip(answered, logits.argmax(1), strict=True)} == direct
    assert got.meta | {"created": None} == {
        "format": "splitleak-capture",
        "version": 1,
        "tap": "proxy",
        "created": None,
        "cloud": f"127.0.0.1:{cloud}",
        "dataset": DATASET,
        "records": 50,
        "responses": 50,
        "dropped": 0,
        "errors": 0,
        "skipped": 0,
        "truncated": False,
    }


def test_errors_pass_through_the_proxy_unchanged(shipped_cloud, tmp_path):
    good = np.zeros((1, 16, 32, 32), np.float32)
    requests = [
        codec.encode_request("no-such-model", {"activation": good}),  # NOT_FOUND
        codec.encode_request("resnet20-cifar10.layer1", {"activation": good[:, :8]}),  # INVALID_ARGUMENT
        codec.encode_request("resnet20-cifar10.layer1", {"activation": good}, request_id="7"),  # OK
    ]
    sink = capture.CaptureSink(
        capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=f"127.0.0.1:{shipped_cloud}")
    )
    tap = proxy.Proxy(f"127.0.0.1:{shipped_cloud}", sink)
    answers = {}
    try:
        for name, port in (("direct", shipped_cloud), ("proxied", tap.start())):
            with transport.channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                answers[name] = {
                    "infer": [_status(stub.ModelInfer, r) for r in requests[:2]],
                    "metadata": _status(stub.ModelMetadata, pb.ModelMetadataRequest(name="no-such-model")),
                    # A method the cloud does not have goes through the proxy's generic path.
                    "unknown": _status(channel.unary_unary(f"/{transport.SERVICE_NAME}/NoSuchMethod"), b""),
                    "server_metadata": channel.unary_unary(f"/{transport.SERVICE_NAME}/ServerMetadata")(b""),
                    "stream": [(r.error_message, r.infer_response.id) for r in stub.ModelStreamInfer(iter(requests))],
                }
        with transport.channel(f"127.0.0.1:{tap.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=transport.SERVICE_NAME)
            )
    finally:
        tap.stop()
        sink.close()

    assert answers["proxied"] == answers["direct"]
    assert answers["direct"]["infer"][0][0] == grpc.StatusCode.NOT_FOUND
    assert "is not served here" in answers["direct"]["infer"][0][1]
    assert answers["direct"]["infer"][1][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert answers["direct"]["unknown"][0] == grpc.StatusCode.UNIMPLEMENTED
    assert answers["direct"]["stream"][2] == ("", "7")
    assert check.status == health_pb2.HealthCheckResponse.SERVING  # answered by the proxy itself
    assert tap.stats == {"forwarded": 2 + 1 + 1 + 1 + 3, "captured": 2 + 3, "dropped": 0, "errors": 0}
    # The attacker keeps even the requests that the cloud turned down.
    assert [r.model_name for r in capture.read(tmp_path).records] == [r.model_name for r in requests[:2] + requests]


def test_a_call_the_cloud_refuses_at_once_comes_back_with_the_cloud_s_status_every_time(shipped_cloud, tmp_path):
    # The cloud refuses an unknown method before it reads the request, so the proxy's write races the refusal; the
    # client library then reports its own INTERNAL (grpc/grpc#36066), which came through some 2 calls in 100.
    sink = capture.CaptureSink(capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud="cloud"))
    tap = proxy.Proxy(f"127.0.0.1:{shipped_cloud}", sink)
    try:
        with transport.channel(f"127.0.0.1:{tap.start()}") as channel:
            unknown = channel.unary_unary(f"/{transport.SERVICE_NAME}/NoSuchMethod")
            statuses = collections.Counter(_status(unknown, b"") for _ in range(300))
    finally:
        tap.stop()
        sink.close()
    assert statuses == {(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"): 300}


class Echo(grpc.GenericRpcHandler):
    """A stand-in cloud that shows what reached it: the request, its metadata and its deadline."""

    def service(self, handler_call_details):
        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = dict(context.invocation_metadata())
            context.set_trailing_metadata(
                [("seen-key", metadata.get("key", "")), ("deadline-s", f"{context.time_remaining():.0f}")]
            )
            if request == b"fail":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
            return request

        return grpc.unary_unary_rpc_method_handler(echo)


def test_metadata_and_deadlines_reach_the_cloud_and_its_trailing_metadata_comes_back(tmp_path):
    cloud = grpc.server(futures.ThreadPoolExecutor(2))
    cloud.add_generic_rpc_handlers((Echo(),))
    cloud_port = cloud.add_insecure_port("127.0.0.1:0")
    cloud.start()
    sink = capture.CaptureSink(capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None))
    tap = proxy.Proxy(f"127.0.0.1:{cloud_port}", sink)
    try:
        with transport.channel(f"127.0.0.1:{tap.start()}") as channel:
            infer = channel.unary_unary(f"/{transport.SERVICE_NAME}/ModelInfer")
            response, call = infer.with_call(b"\x00raw bytes", metadata=[("key", "value")], timeout=60)
            with pytest.raises(grpc.RpcError) as failed:
                infer(b"fail", metadata=[("key", "again")], timeout=60)
    finally:
        tap.stop()
        sink.close()
        cloud.stop(None)

    assert response == b"\x00raw bytes"
    trailing = dict(call.trailing_metadata())
    assert trailing["seen-key"] == "value" and 50 < float(trailing["deadline-s"]) <= 60
    assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
    assert dict(failed.value.trailing_metadata())["seen-key"] == "again"


def _status(method, request) -> tuple[grpc.StatusCode, str]:
    try:
        method(request)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def facts(record: capture.CapturedRequest) -> tuple:
    return record.model_name, record.split_point, record.frame_id


@pytest.mark.slow
def test_the_curious_cloud_records_what_the_proxy_captures_in_the_same_format(tiny_model_dir, tmp_path):
    cloud_proc, cloud_port = start_cloud([tiny_model_dir], ["--record", str(tmp_path / "cloud"), "--dataset", DATASET])
    try:
        proxy_proc, port = proxy.start_process(f"127.0.0.1:{cloud_port}", tmp_path / "proxy", dataset=DATASET)
        try:
            predictions = run_device(port, tiny_model_dir, tmp_path / "device.json", limit=20)
        finally:
            assert stop(proxy_proc) == 0
    finally:
        assert stop(cloud_proc) == 0

    by_proxy, by_cloud = capture.read(tmp_path / "proxy"), capture.read(tmp_path / "cloud")
    assert (by_proxy.meta["tap"], by_cloud.meta["tap"]) == ("proxy", "cloud")
    assert by_proxy.meta.keys() == by_cloud.meta.keys()
    assert by_cloud.meta["dataset"] == DATASET and by_cloud.meta["cloud"] == f"127.0.0.1:{cloud_port}"
    assert len(by_cloud.records) == len(by_proxy.records) == 20
    for seen_by_cloud, seen_by_proxy in zip(by_cloud.records, by_proxy.records, strict=True):
        assert facts(seen_by_cloud) == facts(seen_by_proxy)
        np.testing.assert_array_equal(seen_by_cloud.activation, seen_by_proxy.activation)
        assert seen_by_proxy.captured_ns <= seen_by_cloud.captured_ns  # the proxy sees each request first
    head = Head(tiny_model_dir)
    frame_ids, activations = by_cloud.activations(head.served_name)
    assert sorted(frame_ids.tolist()) == sorted(predictions)
    np.testing.assert_array_equal(activations, head_on_originals(head, by_cloud, frame_ids))


def test_the_taps_never_import_torch():
    code = "import sys, splitleak.attacker.proxy, splitleak.cloud.server; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# The proxy as a server: idle streams cannot starve it either, and it ends within its grace period.


@pytest.fixture
def start_tap(shipped_cloud, tmp_path):
    """Starts an in-process proxy to the shipped cloud with the limits given; returns its address."""
    cloud = f"127.0.0.1:{shipped_cloud}"
    sink = capture.CaptureSink(capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=cloud))
    taps = []

    def start(limits: serving.Limits) -> str:
        taps.append(proxy.Proxy(cloud, sink, limits=limits))
        return f"127.0.0.1:{taps[-1].start()}"

    yield start
    for tap in taps:
        tap.stop()
    sink.close()


def test_twenty_idle_streams_through_the_proxy_do_not_stop_a_new_device_or_a_health_check(start_tap):
    limit = serving.MAX_STREAMS_PER_CONNECTION  # the proxy's bound, and the cloud's on the device's own connection
    outcomes = twenty_idle_streams_then_a_device(start_tap(serving.Limits()))
    assert outcomes == {True: limit, grpc.StatusCode.RESOURCE_EXHAUSTED: 20 - limit}


def test_a_stream_idle_at_the_proxy_is_closed_and_one_over_the_limit_is_answered_in_band_by_the_cloud(start_tap):
    tap = start_tap(serving.Limits(idle_timeout_s=1.0))
    over_limit = pb.ModelInferRequest.FromString(good())
    over_limit.raw_input_contents.append(bytes(transport.MAX_MESSAGE_BYTES))
    options = [("grpc.max_send_message_length", transport.MAX_RECEIVE_BYTES), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(tap, options=options) as channel:
        stream = OpenStream(channel)
        assert stream.ask(over_limit.SerializeToString()).error_message.startswith("RESOURCE_EXHAUSTED: message of")
        assert is_answered(stream.ask(good()))
        with pytest.raises(grpc.RpcError) as ended:
            next(stream.call)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no request for 1 s" in ended.value.details()


def test_the_proxy_ends_within_its_grace_period_on_sigterm_with_a_stream_open(shipped_cloud, tmp_path):
    proc, port = proxy.start_process(f"127.0.0.1:{shipped_cloud}", tmp_path / "capture", extra=["--grace", "2"])
    with connection(f"127.0.0.1:{port}") as channel:
        stream = OpenStream(channel)
        assert is_answered(stream.ask(good()))
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            next(stream.call)
    assert proc.wait(2 + 20) == 0  # the grace period, and time to stop a Python process on a busy machine
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
    assert len(capture.read(tmp_path / "capture").records) == 1
