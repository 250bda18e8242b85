"""What the man in the middle costs: one frame's round trip device -> cloud against device -> proxy -> cloud.

One unary ModelInfer of the default split's activation (ResNet-20 on CIFAR-10: layer1, 16x32x32 fp32, 64 KiB),
the cloud and the proxy each a real process on loopback, the proxy writing its capture as it would in an attack.
Both routes are measured in the same run; the proxied one reports `ratio` (its median over the direct median).

    .venv/bin/pytest bench/bench_proxy.py --benchmark-enable
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitleak import codec, manifest, transport
from splitleak.attacker import proxy
from splitleak.device.client import Head
from splitleak.local import start_cloud, stop
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

MODEL_DIR = manifest.DEFAULT_MODEL_DIR  # the shipped model; a random-init ResNet-20 is exported when it is absent
SPLIT = None  # None: the model's default split point
ROUNDS = 500
WARMUP_ROUNDS = 50
SEED = 0

medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if (MODEL_DIR / "manifest.json").exists():
        return MODEL_DIR
    # Timing does not depend on the weights, so untrained ones do: no training run, no data set needed.
    from splitleak import export, zoo

    out = tmp_path_factory.mktemp("resnet20-random")
    entry = zoo.ZOO["resnet20"]
    export.export(
        zoo.build("resnet20"),
        out,
        name="resnet20-cifar10",
        model_name="resnet20",
        dataset="cifar10",
        classes=[str(i) for i in range(10)],
        input_shape=(3, 32, 32),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        split_points=entry.split_points,
        default_split=entry.default_split,
    )
    return out


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
def test_round_trip_of_one_frame(benchmark, routes, frame_request, route):
    benchmark.group = "ModelInfer round trip, one frame"
    with transport.channel(f"127.0.0.1:{routes[route]}") as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        infer(frame_request, wait_for_ready=True)  # connected before the clock starts
        benchmark.pedantic(infer, args=(frame_request,), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats is None:  # --benchmark-disable (the default in pyproject) runs it once, untimed
        return
    medians[route] = benchmark.stats.stats.median
    if route == "proxy" and "direct" in medians:
        ratio = medians["proxy"] / medians["direct"]
        benchmark.extra_info["ratio"] = round(ratio, 3)
        print(
            f"\nround trip: direct {medians['direct'] * 1e3:.3f} ms, through the proxy "
            f"{medians['proxy'] * 1e3:.3f} ms (median of {ROUNDS}): ratio {ratio:.2f}"
        )
