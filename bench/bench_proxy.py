"""What the man in the middle costs: one frame's round trip device -> cloud against device -> proxy -> cloud.

One unary ModelInfer of the default split's activation (ResNet-20 on CIFAR-10: layer1, 16x32x32 fp32, 64 KiB),
the cloud and the proxy each a real process on loopback, the proxy writing its capture as it would in an attack.
Both routes are measured in the same run; the proxied one reports `ratio` (its median over the direct median). The
same over the device's stream, with a bare grpcio stream echo carrying the same bytes beside them: what the proxy
adds, in bare hops.

    .venv/bin/pytest bench/bench_proxy.py --benchmark-enable
"""

from __future__ import annotations

import bare_echo
import numpy as np
import pytest

from splitleak.attacker import proxy
from splitleak.core import codec, transport
from splitleak.core.process import start_cloud, stop
from splitleak.device.head import Head
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

SPLIT = None  # None: the model's default split point
ROUNDS = 500
WARMUP_ROUNDS = 50
SEED = 0


@pytest.fixture(scope="module")
def routes(model_dir, tmp_path_factory) -> dict[str, int]:
    """The port to call for each route."""
    cloud, cloud_port = start_cloud([model_dir])
    tap, tap_port = proxy.start_process(f"127.0.0.1:{cloud_port}", tmp_path_factory.mktemp("bench") / "capture")
    yield {"direct": cloud_port, "proxy": tap_port}
    stop(tap)
    stop(cloud)


@pytest.fixture(scope="module")
def frame_request(model_dir) -> pb.ModelInferRequest:
    head = Head(model_dir, SPLIT)
    image = np.random.default_rng(SEED).integers(0, 256, (1, *head.manifest.input_shape[1:], 3), dtype=np.uint8)
    activation = head.run(head.manifest.preprocess(image))
    params = {"split_point": head.split.name, "frame_id": 0}
    return codec.encode_request(head.served_name, {"activation": activation}, parameters=params)


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_round_trip_of_one_frame(benchmark, ratios, routes, frame_request, route):
    benchmark.group = "ModelInfer round trip, one frame"
    with transport.channel(f"127.0.0.1:{routes[route]}") as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        infer(frame_request, wait_for_ready=True)  # connected before the clock starts
        benchmark.pedantic(infer, args=(frame_request,), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    ratios.record(benchmark, f"round trip {route}", baseline=None if route == "direct" else "round trip direct")


@pytest.mark.parametrize("route", ["bare hop", "direct", "proxy"])
def test_stream_round_trip_of_one_frame(benchmark, ratios, routes, frame_request, route):
    """Over the device's stream. `bare hop` is one stream round trip to a bare grpcio echo with the same bytes
    (bench/bare_echo.py): the proxy adds no more than one hop when proxy - direct <= bare hop, printed below."""
    benchmark.group = "ModelStreamInfer round trip, one frame"
    payload = frame_request.SerializeToString()
    bare = None
    if route == "bare hop":
        with transport.channel(f"127.0.0.1:{routes['direct']}") as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(frame_request)
        bare, port = bare_echo.start(pb.ModelStreamInferResponse(infer_response=reply).ByteSize())
        method = "/bare.Echo/Stream"
    else:
        port, method = routes[route], f"/{transport.SERVICE_NAME}/ModelStreamInfer"
    try:
        bare_echo.time_stream(benchmark, port, method, payload, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    finally:
        if bare is not None:
            stop(bare)
    ratios.record(benchmark, f"stream {route}", baseline=None if route != "proxy" else "stream direct")
    if route == "proxy" and benchmark.stats is not None:
        added = ratios.medians["stream proxy"] - ratios.medians["stream direct"]
        hops = added / ratios.medians["stream bare hop"]
        benchmark.extra_info["added bare hops"] = round(hops, 3)
        print(f"the proxy adds {added * 1e3:.3f} ms, {hops:.2f} bare hops")
