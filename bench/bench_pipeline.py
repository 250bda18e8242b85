"""What the split pipeline costs, side by side with its floors.

1. Transport: one frame's device -> cloud round trip (encode the activation as an OIP request, ModelInfer to a real
   `splitleak cloud` process, decode the logits) against a bare grpcio unary call carrying the same number of bytes
   each way to a server that does nothing (bench/bare_echo.py); and the same over the stream the device uses
   (ModelStreamInfer, one request then its answer) against the bare server's stream echo. At `layer3` the tail is a
   pooling and one linear layer, so the ratio is what the protocol, validation and serving cost; at `stem` the tail
   is most of the model.
2. Compute: the head at batch 1 in ONNX Runtime (what the device runs) against the same head in PyTorch eager.

    make bench    # or: .venv/bin/pytest bench/bench_pipeline.py -o python_files='bench_*.py' --benchmark-enable -s
"""

from __future__ import annotations

from pathlib import Path

import bare_echo
import numpy as np
import pytest
import torch

from splitleak.core import codec, transport
from splitleak.core.process import start_cloud, stop
from splitleak.device.head import Head
from splitleak.model import zoo
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

SPLITS = ("stem", "layer3")
ROUNDS = 500
WARMUP_ROUNDS = 50
SEED = 0


@pytest.fixture(scope="module")
def cloud_port(model_dir):
    proc, port = start_cloud([model_dir])
    yield port
    stop(proc)


def frame_request(model_dir: Path, split: str):
    head = Head(model_dir, split)
    image = np.random.default_rng(SEED).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    activation = head.run(head.manifest.preprocess(image))
    return codec.encode_request(head.served_name, {"activation": activation}, parameters={"frame_id": 0})


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("route", ["bare grpcio", "splitleak"])
def test_round_trip_of_one_frame(benchmark, ratios, model_dir, cloud_port, split, route):
    benchmark.group = f"round trip, one frame at {split}"
    request = frame_request(model_dir, split)
    with transport.channel(f"127.0.0.1:{cloud_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(request, wait_for_ready=True)

        def splitleak_call():
            codec.decode_response(
                stub.ModelInfer(
                    codec.encode_request(request.model_name, codec.decode_request(request), parameters={"frame_id": 0})
                )
            )

        if route == "splitleak":
            benchmark.pedantic(splitleak_call, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
            ratios.record(benchmark, f"splitleak {split}", baseline=f"bare grpcio {split}")
            return
    bare, port = bare_echo.start(reply.ByteSize())
    try:
        with transport.channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bare.Echo/Call")
            payload = request.SerializeToString()
            call(payload, wait_for_ready=True)
            benchmark.pedantic(call, args=(payload,), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
            ratios.record(benchmark, f"bare grpcio {split}")
    finally:
        stop(bare)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("route", ["bare grpcio", "bare grpc.aio", "splitleak"])
def test_stream_round_trip_of_one_frame(benchmark, ratios, model_dir, cloud_port, split, route):
    """The device's own call: ModelStreamInfer, one request then its answer, against a bare stream echo that answers
    each message with as many bytes as the cloud's answer holds. Both take the same serialized request, so the ratio
    is what the cloud adds: parsing, checks, the tail, the answer, the server's own machinery. `bare grpc.aio` is the
    same echo on the asyncio server the cloud is built on: its ratio is what that server costs before any work."""
    benchmark.group = f"stream round trip, one frame at {split}"
    payload = frame_request(model_dir, split).SerializeToString()
    bare = None
    if route.startswith("bare"):
        with transport.channel(f"127.0.0.1:{cloud_port}") as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(frame_request(model_dir, split))
        size = pb.ModelStreamInferResponse(infer_response=reply).ByteSize()
        bare, port = bare_echo.start(size, aio=route == "bare grpc.aio")
        method = "/bare.Echo/Stream"
    else:
        port, method = cloud_port, f"/{transport.SERVICE_NAME}/ModelStreamInfer"
    try:
        bare_echo.time_stream(benchmark, port, method, payload, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    finally:
        if bare is not None:
            stop(bare)
    ratios.record(
        benchmark, f"stream {route} {split}", baseline=None if route == "bare grpcio" else f"stream bare grpcio {split}"
    )


@pytest.mark.parametrize("split", ("stem", "layer1", "layer2", "layer3"))
@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime"])
def test_head_at_batch_1(benchmark, ratios, model_dir, split, runtime):
    benchmark.group = f"head at batch 1, {split}"
    head = Head(model_dir, split)
    x = head.manifest.preprocess(np.random.default_rng(SEED).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    if runtime == "onnxruntime":
        benchmark.pedantic(head.run, args=(x,), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
        ratios.record(benchmark, f"onnxruntime {split}", baseline=f"pytorch {split}")
        return
    torch.set_num_threads(1)  # as the device's ONNX Runtime session (intra_op_num_threads=1)
    torch_head = zoo.split(zoo.build("resnet20").eval(), split)[0]
    tx = torch.from_numpy(x)
    with torch.inference_mode():
        benchmark.pedantic(torch_head, args=(tx,), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    ratios.record(benchmark, f"pytorch {split}")
