"""The cloud serves many devices and cannot be starved, on real `splitleak cloud` processes over real gRPC: idle
streams, many devices at once, the bounds and their messages, the idle timeout, a client that reads nothing,
SIGTERM, a port already held, and command-line values that make no sense."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitleak.attacker import proxy
from splitleak.cloud import server
from splitleak.core import codec, manifest, serving, transport
from splitleak.core.process import start_cloud, stop
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

MODEL = manifest.load()  # the shipped ResNet-20
SPLIT = "layer3"  # the smallest tail: these tests are about the server, not the model
STREAM = f"/{transport.SERVICE_NAME}/ModelStreamInfer"
UNDECODABLE = b"\x0a\xff\xff\xff"  # a model_name whose length runs past the end of the message
TIMEOUT_S = 60  # every call's own deadline: a test that would hang fails instead


def good(request_id: str = "") -> bytes:
    shape = MODEL.split(SPLIT).activation_shape
    activation = np.ones((1, *shape), np.float32)
    return codec.encode_request(
        MODEL.served_name(SPLIT), {"activation": activation}, request_id=request_id
    ).SerializeToString()


def start(*extra: str) -> tuple[subprocess.Popen, str]:
    proc, port = start_cloud([MODEL.root], list(extra))
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cloud():
    proc, target = start()
    yield target
    stop(proc)


def connection(target: str) -> grpc.Channel:
    """A channel with a connection of its own: gRPC otherwise shares one between channels to the same target."""
    return grpc.insecure_channel(target, options=[*transport.OPTIONS, ("grpc.use_local_subchannel_pool", 1)])


class OpenStream:
    """A ModelStreamInfer that sends what the test gives it, when it gives it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue = queue.Queue()
        call = channel.stream_stream(STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString)
        self.call = call(iter(self._requests.get, None), timeout=TIMEOUT_S)

    def send(self, raw: bytes) -> None:
        self._requests.put(raw)

    def ask(self, raw: bytes) -> pb.ModelStreamInferResponse:
        self.send(raw)
        return next(self.call)

    def close(self) -> None:
        self._requests.put(None)


def status_of(stream: OpenStream, raw: bytes = b"") -> tuple[grpc.StatusCode, str]:
    """How the stream ends: after `raw`'s answer if given, else at once."""
    try:
        if raw:
            stream.ask(raw)
        next(stream.call)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the stream went on")


def is_answered(response: pb.ModelStreamInferResponse) -> bool:
    return not response.error_message and codec.decode_response(response.infer_response)["logits"].shape == (1, 10)


def twenty_idle_streams_then_a_device(target: str) -> Counter:
    """Open 20 streams on one connection, each asking once and then sitting there; with them open, a health check,
    ServerLive and a new device's stream must be answered. Returns how the 20 fared."""
    with connection(target) as idle:
        streams = [OpenStream(idle) for _ in range(20)]
        outcomes = Counter()
        for stream in streams:
            try:
                outcomes[is_answered(stream.ask(good()))] += 1
            except grpc.RpcError as e:
                outcomes[e.code()] += 1
        with connection(target) as device:
            stub = pb_grpc.GRPCInferenceServiceStub(device)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            check = health_pb2_grpc.HealthStub(device).Check(
                health_pb2.HealthCheckRequest(service=transport.SERVICE_NAME), timeout=10
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            stream = OpenStream(device)
            assert all(is_answered(stream.ask(good(str(i)))) for i in range(5))
            stream.close()
        for stream in streams:
            stream.close()
    return outcomes


def test_twenty_idle_streams_from_one_client_do_not_stop_a_new_device_or_a_health_check(cloud):
    limit = serving.MAX_STREAMS_PER_CONNECTION  # which ones are refused: as they came
    assert twenty_idle_streams_then_a_device(cloud) == {True: limit, grpc.StatusCode.RESOURCE_EXHAUSTED: 20 - limit}


def test_thirty_two_devices_streaming_at_once_are_all_served(cloud):
    frames, devices = 20, 32
    start_together = threading.Barrier(devices)
    answered = [0] * devices

    def device(i: int) -> None:
        with connection(cloud) as channel:
            stream = OpenStream(channel)
            start_together.wait()
            answered[i] = sum(is_answered(stream.ask(good(str(f)))) for f in range(frames))  # one frame in flight
            stream.close()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answered == [frames] * devices


def test_calls_over_a_bound_are_refused_with_the_bound_and_its_value_in_the_message():
    proc, target = start("--max-streams", "3", "--max-streams-per-connection", "2")
    try:
        with connection(target) as first, connection(target) as second:
            held = [OpenStream(first), OpenStream(first), OpenStream(second)]
            assert all(is_answered(stream.ask(good())) for stream in held)
            code, message = status_of(OpenStream(first), good())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 inference calls open" in message and "--max-streams-per-connection 2" in message
            code, message = status_of(OpenStream(second), good())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams 3" in message
            held[0].close()
            assert list(held[0].call) == []  # ended cleanly, and its slot with it
            latecomer = OpenStream(second)
            assert is_answered(latecomer.ask(good()))
            for stream in [*held[1:], latecomer]:
                stream.close()
    finally:
        stop(proc)


def test_a_stream_that_sends_nothing_for_the_idle_timeout_is_closed_saying_so():
    proc, target = start("--idle-timeout", "1")
    try:
        with connection(target) as channel:
            stream = OpenStream(channel)
            assert is_answered(stream.ask(good()))
            code, message = status_of(stream)
            assert (code, message) == (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "no request for 1 s; a stream idle that long is closed",
            )
    finally:
        stop(proc)


def test_a_client_that_reads_none_of_its_answers_loses_its_stream_and_frees_its_slot():
    proc, target = start("--idle-timeout", "1", "--max-streams", "1")
    # No window growth, so that the answers left unread fill the transport's buffers soon.
    small_window = [*transport.OPTIONS, ("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    try:
        with grpc.insecure_channel(target, options=small_window) as greedy, connection(target) as device:
            requests: queue.Queue = queue.Queue()
            greedy.stream_stream(STREAM)(iter(requests.get, None), timeout=TIMEOUT_S)
            for _ in range(5000):
                requests.put(UNDECODABLE)  # each answered in-band; none read
            for _ in range(TIMEOUT_S * 2):  # the one slot frees an idle timeout after the buffers fill
                try:
                    if is_answered(OpenStream(device).ask(good())):
                        break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                threading.Event().wait(0.5)
            else:
                pytest.fail("the stream that reads nothing kept its slot")
            requests.put(None)
    finally:
        stop(proc)


def test_sigterm_during_a_stream_whose_next_message_is_undecodable_stops_within_the_grace_period():
    proc, target = start("--grace", "2")
    with connection(target) as channel:
        stream = OpenStream(channel)
        assert is_answered(stream.ask(good()))
        assert stream.ask(UNDECODABLE).error_message.startswith("INVALID_ARGUMENT: not a ModelInferRequest")
        stream.send(UNDECODABLE)
        proc.send_signal(signal.SIGTERM)
        answers = []
        with pytest.raises(grpc.RpcError) as ended:
            answers.extend(stream.call)  # the second one's answer, if it was read before the signal
    assert proc.wait(2 + 20) == 0  # the grace period, and time to stop a Python process on a busy machine
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
    assert all(a.error_message.startswith("INVALID_ARGUMENT") for a in answers)


def test_a_port_already_held_is_refused_in_one_line_by_a_second_cloud_and_by_a_proxy(cloud):
    port = cloud.rsplit(":", 1)[1]
    second = [sys.executable, "-m", "splitleak.cli", "cloud", "--port", port, "--models", str(MODEL.root)]
    tap = [sys.executable, "-m", "splitleak.cli", "attacker", "proxy", "--listen-port", port, "--cloud", cloud]
    for cmd, who in ((second, "cloud"), ([*tap, "--feed", "127.0.0.1:9"], "proxy")):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr == f"{who}: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize(
    "module, argv, complaint",
    [
        (server, ["--port", "70000"], "argument --port: 70000 is not a port"),
        (server, ["--port", "-1"], "argument --port: -1 is not a port"),
        (server, ["--workers", "0"], "argument --workers: must be at least 1, got 0"),
        (server, ["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
        (server, ["--max-streams", "0"], "argument --max-streams: must be at least 1, got 0"),
        (server, ["--idle-timeout", "0"], "argument --idle-timeout: must be more than 0, got 0"),
        (server, ["--grace", "nan"], "argument --grace: expected a finite number, got 'nan'"),
        (server, ["--batch-max", "0"], "argument --batch-max: must be at least 1, got 0"),
        (server, ["--batch-delay-ms", "-1"], "argument --batch-delay-ms: must be at least 0, got -1"),
        (proxy, ["--cloud", "garbage"], "argument --cloud: 'garbage' is not HOST:PORT"),
        (proxy, ["--cloud", "127.0.0.1:0"], "argument --cloud: '127.0.0.1:0' is not HOST:PORT"),
        (proxy, ["--cloud", "h:1", "--listen-port", "65536"], "argument --listen-port: 65536 is not a port"),
        (proxy, ["--cloud", "h:1", "--queue", "0"], "argument --queue: must be at least 1, got 0"),
    ],
)
def test_command_line_values_that_make_no_sense_are_one_line_of_usage(module, argv, complaint, capsys):
    with pytest.raises(SystemExit) as exited:
        module.get_args_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and complaint in err and "Traceback" not in err
